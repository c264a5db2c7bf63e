// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
//
// Per-cgroup traffic counters, aggregated in the kernel. cgroup_skb programs attached at
// the pod cgroup root (with BPF_F_ALLOW_MULTI, beside the CNI's and systemd's) see every
// packet of every socket below it, hostNetwork pods included, and add it to a per-CPU hash
// keyed by (cgroup id, direction, peer class). Nothing is streamed per packet.
//
// The peer class comes from an LPM trie userspace fills from config (pod CIDR, service
// CIDR, node CIDR, object stores, named peers). It is looked up with the socket's remote
// address, not the packet's, so NAT does not split one flow across classes; packets with
// no full socket fall back to the header's remote address.
//
// Only uapi types are read (struct __sk_buff, struct bpf_sock), so no CO-RE relocation is
// needed here; the program needs no kernel headers beyond linux/bpf.h.

#include <linux/bpf.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

// Helpers, by id (what libbpf's bpf_helper_defs.h spells out).
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) = (void *)BPF_FUNC_map_update_elem;
static __u64 (*bpf_skb_cgroup_id)(struct __sk_buff *skb) = (void *)BPF_FUNC_skb_cgroup_id;
static struct bpf_sock *(*bpf_sk_fullsock)(struct bpf_sock *sk) = (void *)BPF_FUNC_sk_fullsock;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) = (void *)BPF_FUNC_skb_load_bytes;

#define DIR_INGRESS 0
#define DIR_EGRESS 1
#define ETH_P_IP_BE 0x0008   // htons(0x0800)
#define ETH_P_IPV6_BE 0xDD86 // htons(0x86DD)
#define PROTO_TCP 6
#define PROTO_UDP 17

struct traffic_key {
	__u64 cgroup_id;
	__u8 direction;
	__u8 peer_class;
	__u8 pad[6];
};

struct traffic_val {
	__u64 bytes;         // IP packet length, headers included
	__u64 packets;       // skbs (a GSO skb counts once)
	__u64 payload_bytes; // TCP/UDP payload
};

// An IPv6 address; IPv4 as ::ffff:a.b.c.d, so one trie serves both.
struct peer_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct traffic_key);
	__type(value, struct traffic_val);
} TRAFFIC SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct peer_key);
	__type(value, __u8);
} PEERS SEC(".maps");

// Packets the program could not attribute (no cgroup id) or count (map full).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} ERRORS SEC(".maps");

#define ERR_NO_CGROUP 0
#define ERR_MAP_FULL 1

static __always_inline void count_error(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&ERRORS, &which);
	if (n)
		*n += 1;
}

static __always_inline void v4_mapped(struct peer_key *k, __u32 ip4)
{
	__builtin_memset(k->addr, 0, 10);
	k->addr[10] = 0xff;
	k->addr[11] = 0xff;
	__builtin_memcpy(&k->addr[12], &ip4, 4);
}

static __always_inline __u8 classify(struct peer_key *k)
{
	k->prefixlen = 128;
	__u8 *c = bpf_map_lookup_elem(&PEERS, k);
	return c ? *c : 0;
}

// Header lengths and the remote address from the packet (the fallback when there is no
// full socket). Returns the payload length, or 0 when it cannot be parsed.
static __always_inline __u32 parse(struct __sk_buff *skb, int direction, struct peer_key *peer, int *have_peer)
{
	__u32 len = skb->len;
	if (skb->protocol == ETH_P_IP_BE) {
		__u8 vihl;
		__u8 proto;
		__u32 addr;
		if (bpf_skb_load_bytes(skb, 0, &vihl, 1) || bpf_skb_load_bytes(skb, 9, &proto, 1))
			return 0;
		__u32 ihl = (vihl & 0x0f) * 4;
		if (bpf_skb_load_bytes(skb, direction == DIR_INGRESS ? 12 : 16, &addr, 4) == 0) {
			v4_mapped(peer, addr);
			*have_peer = 1;
		}
		if (proto == PROTO_TCP) {
			__u8 doff;
			if (bpf_skb_load_bytes(skb, ihl + 12, &doff, 1))
				return 0;
			__u32 hdr = ihl + (doff >> 4) * 4;
			return len > hdr ? len - hdr : 0;
		}
		if (proto == PROTO_UDP)
			return len > ihl + 8 ? len - ihl - 8 : 0;
		return 0;
	}
	if (skb->protocol == ETH_P_IPV6_BE) {
		__u8 next;
		if (bpf_skb_load_bytes(skb, 6, &next, 1))
			return 0;
		if (bpf_skb_load_bytes(skb, direction == DIR_INGRESS ? 8 : 24, peer->addr, 16) == 0)
			*have_peer = 1;
		// Extension headers are not walked: their payload counts as 0, bytes still count.
		if (next == PROTO_TCP) {
			__u8 doff;
			if (bpf_skb_load_bytes(skb, 40 + 12, &doff, 1))
				return 0;
			__u32 hdr = 40 + (doff >> 4) * 4;
			return len > hdr ? len - hdr : 0;
		}
		if (next == PROTO_UDP)
			return len > 48 ? len - 48 : 0;
	}
	return 0;
}

static __always_inline int account(struct __sk_buff *skb, int direction)
{
	struct traffic_key key = {};
	key.cgroup_id = bpf_skb_cgroup_id(skb);
	if (!key.cgroup_id) {
		count_error(ERR_NO_CGROUP);
		return 1;
	}
	key.direction = direction;

	struct peer_key peer = {};
	int have_peer = 0;
	__u32 payload = parse(skb, direction, &peer, &have_peer);

	// The socket's remote address wins over the header's (NAT-stable). A listening socket
	// has none (SYN, SYN-ACK): keep the header's then.
	struct bpf_sock *sk = skb->sk;
	if (sk) {
		sk = bpf_sk_fullsock(sk);
		if (sk) {
			if (sk->family == 2 /* AF_INET */) {
				__u32 d = sk->dst_ip4;
				if (d) {
					v4_mapped(&peer, d);
					have_peer = 1;
				}
			} else if (sk->family == 10 /* AF_INET6 */) {
				__u32 a0 = sk->dst_ip6[0], a1 = sk->dst_ip6[1], a2 = sk->dst_ip6[2], a3 = sk->dst_ip6[3];
				if (a0 | a1 | a2 | a3) {
					__builtin_memcpy(&peer.addr[0], &a0, 4);
					__builtin_memcpy(&peer.addr[4], &a1, 4);
					__builtin_memcpy(&peer.addr[8], &a2, 4);
					__builtin_memcpy(&peer.addr[12], &a3, 4);
					have_peer = 1;
				}
			}
		}
	}
	key.peer_class = have_peer ? classify(&peer) : 0;

	struct traffic_val *v = bpf_map_lookup_elem(&TRAFFIC, &key);
	if (v) {
		v->bytes += skb->len;
		v->packets += 1;
		v->payload_bytes += payload;
	} else {
		struct traffic_val init = { .bytes = skb->len, .packets = 1, .payload_bytes = payload };
		if (bpf_map_update_elem(&TRAFFIC, &key, &init, BPF_NOEXIST) && (v = bpf_map_lookup_elem(&TRAFFIC, &key))) {
			// Lost a race with another CPU's insert: add to the entry it made.
			v->bytes += skb->len;
			v->packets += 1;
			v->payload_bytes += payload;
		} else if (!bpf_map_lookup_elem(&TRAFFIC, &key)) {
			count_error(ERR_MAP_FULL);
		}
	}
	return 1; // observe only: always let the packet through
}

SEC("cgroup_skb/ingress")
int netobs_ingress(struct __sk_buff *skb)
{
	return account(skb, DIR_INGRESS);
}

SEC("cgroup_skb/egress")
int netobs_egress(struct __sk_buff *skb)
{
	return account(skb, DIR_EGRESS);
}

char _license[] SEC("license") = "Dual BSD/GPL";
