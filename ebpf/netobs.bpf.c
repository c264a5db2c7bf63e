// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
//
// Per-cgroup traffic counters, aggregated in the kernel. cgroup_skb programs attached at
// the pod cgroup root (as BPF links, which coexist with the CNI's and systemd's) see every
// packet of every socket below it, hostNetwork pods included, and add it to a per-CPU hash
// keyed by (cgroup id, direction, peer class). Nothing is streamed per packet.
//
// The peer class comes from an LPM trie userspace fills from config (pod CIDR, service
// CIDR, node CIDR, object stores, named peers). It is looked up with the socket's remote
// address, not the packet's, so NAT does not split one flow across classes; packets with
// no full socket fall back to the header's remote address.
//
// TCP health comes from a sock_ops program at the same root: connections established and
// failed by role, closes (so userspace derives active connections), retransmitted segments,
// RTOs and a log2 histogram of smoothed RTT. sock_ops has no reliable "which cgroup" in
// softirq context, so the socket's cgroup rides in socket-local storage: set by connect() and
// listen() (process context), corrected by cgroup_skb (which knows the socket's own cgroup)
// and cloned from a listener into the sockets it accepts (BPF_F_CLONE).
//
// Bytes on declared listening ports (model-serving ports) carry that port in the traffic
// key, for sockets whose local port userspace put in PORTS (0 for every other socket), so a
// serving packet costs one hash update like any other; userspace sums over ports for the
// traffic series and over peer classes for the listener series.
//
// Only uapi types are read (struct __sk_buff, struct bpf_sock, struct bpf_sock_ops), whose
// offsets the kernel rewrites itself, so no CO-RE relocation is needed; the programs need no
// kernel headers beyond linux/bpf.h.

#include <linux/bpf.h>

// The uapi headers spell __always_inline as plain `inline`, which clang may ignore: it left
// account() as a BPF-to-BPF call made for every packet, with its direction a run-time
// argument. Force it.
#undef __always_inline
#define __always_inline inline __attribute__((always_inline))

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

// Helpers, by id (what libbpf's bpf_helper_defs.h spells out).
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) = (void *)BPF_FUNC_map_update_elem;
static __u64 (*bpf_skb_cgroup_id)(struct __sk_buff *skb) = (void *)BPF_FUNC_skb_cgroup_id;
static struct bpf_sock *(*bpf_sk_fullsock)(struct bpf_sock *sk) = (void *)BPF_FUNC_sk_fullsock;
static void *(*bpf_sk_storage_get)(void *map, void *sk, void *value, __u64 flags) = (void *)BPF_FUNC_sk_storage_get;
static long (*bpf_sock_ops_cb_flags_set)(struct bpf_sock_ops *skops, int flags) = (void *)BPF_FUNC_sock_ops_cb_flags_set;
static __u64 (*bpf_get_current_cgroup_id)(void) = (void *)BPF_FUNC_get_current_cgroup_id;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)BPF_FUNC_ktime_get_ns;

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
	__u16 port; // declared local port (host order), or 0
	__u8 pad[4];
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

// Sized for a node's pods x containers x directions x peer classes (x declared ports on
// serving pods); not preallocated, so an idle node pays for the entries it has, not
// max_entries x CPUs.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct traffic_key);
	__type(value, struct traffic_val);
} TRAFFIC SEC(".maps");

#define ROLE_CLIENT 0 // connect()
#define ROLE_SERVER 1 // accept()
#define RTT_BUCKETS 24 // log2 microseconds: [1us, 2^24us = 16.8 s)

struct tcp_key {
	__u64 cgroup_id;
	__u8 peer_class;
	__u8 role;
	__u8 pad[6];
};

struct tcp_val {
	__u64 established;
	__u64 failed;   // connect() that never reached ESTABLISHED (refused, timed out, aborted)
	__u64 closed;   // established connections that have closed; active = established - closed
	__u64 retrans_segs;
	__u64 rtos;
	__u64 rtt_count;
	__u64 rtt_sum_us;
	__u64 rtt[RTT_BUCKETS]; // bucket i: smoothed RTT in [2^i, 2^(i+1)) us
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 8192);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tcp_key);
	__type(value, struct tcp_val);
} TCP SEC(".maps");

// A zeroed tcp_val to insert from: the value is too large for the 512-byte BPF stack.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tcp_val);
} TCP_ZERO SEC(".maps");

// What a socket carries for the sock_ops program.
struct sock_info {
	__u64 cgroup_id;
	__u64 last_rtt_ns; // last RTT sample taken (at most one a second per connection)
	__u8 role;
	__u8 established;
	__u8 peer_class;    // sock_ops: the connection's class
	__u8 traffic_class; // cgroup_skb: the class cached for `cached_peer`
	__u8 declared;      // cgroup_skb: the local port is a declared serving port
	__u8 pad[3];
	__u32 cached_peer;  // remote address word the cache is for (0: nothing cached)
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct sock_info);
} SOCKS SEC(".maps");

// Declared serving ports (host byte order) -> 1.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u16);
	__type(value, __u8);
} PORTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct peer_key);
	__type(value, __u8);
} PEERS SEC(".maps");

// What the programs could not attribute or count, by index.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} ERRORS SEC(".maps");

#define ERR_NO_CGROUP 0       // packets with no cgroup id
#define ERR_MAP_FULL 1        // TRAFFIC inserts refused
#define ERR_NO_CGROUP_BYTES 2 // their bytes
#define ERR_TCP_FULL 3        // TCP inserts refused
// 4 was LISTEN inserts refused: declared ports now live in TRAFFIC.
#define ERR_NO_SOCK_INFO 5    // TCP events on sockets the programs never saw start (older than the agent)
#define ERR_STORAGE 6         // socket storage could not be created

static __always_inline void count_error_n(__u32 which, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&ERRORS, &which);
	if (v)
		*v += n;
}

static __always_inline void count_error(__u32 which)
{
	count_error_n(which, 1);
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

// Payload length from the headers, read directly from the packet's linear part (the
// headers are there at both hooks; direct reads cost far less than helper calls), and the
// remote address from the header for packets whose socket has none. Returns 0 payload when
// the headers cannot be read or the protocol is neither TCP nor UDP (bytes still count).
static __always_inline __u32 parse(struct __sk_buff *skb, int direction, struct peer_key *peer, int *have_peer)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 len = skb->len;
	if (skb->protocol == ETH_P_IP_BE) {
		__u8 *ip = data;
		if ((void *)(ip + 20) > end)
			return 0;
		__u32 addr;
		__builtin_memcpy(&addr, ip + (direction == DIR_INGRESS ? 12 : 16), 4);
		v4_mapped(peer, addr);
		*have_peer = 1;
		__u32 ihl = (ip[0] & 0x0f) * 4;
		if (ip[9] == PROTO_TCP) {
			__u8 *tcp = ip + ihl;
			if ((void *)(tcp + 13) > end)
				return 0;
			__u32 hdr = ihl + (tcp[12] >> 4) * 4;
			return len > hdr ? len - hdr : 0;
		}
		if (ip[9] == PROTO_UDP)
			return len > ihl + 8 ? len - ihl - 8 : 0;
		return 0;
	}
	if (skb->protocol == ETH_P_IPV6_BE) {
		__u8 *ip6 = data;
		if ((void *)(ip6 + 40) > end)
			return 0;
		__builtin_memcpy(peer->addr, ip6 + (direction == DIR_INGRESS ? 8 : 24), 16);
		*have_peer = 1;
		// Extension headers are not walked: their payload counts as 0, bytes still count.
		if (ip6[6] == PROTO_TCP) {
			__u8 *tcp = ip6 + 40;
			if ((void *)(tcp + 13) > end)
				return 0;
			__u32 hdr = 40 + (tcp[12] >> 4) * 4;
			return len > hdr ? len - hdr : 0;
		}
		if (ip6[6] == PROTO_UDP)
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
		count_error_n(ERR_NO_CGROUP_BYTES, skb->len);
		return 1;
	}
	key.direction = direction;

	struct peer_key peer = {};
	int have_peer = 0;
	__u32 payload = parse(skb, direction, &peer, &have_peer);

	// The socket's remote address wins over the header's (NAT-stable). Its class and
	// whether its local port is declared are cached in the socket's storage, so the trie
	// and the port map are looked up once per connection, not per packet. A socket with
	// no remote address (a listener's SYN and SYN-ACK, unconnected UDP) classifies by
	// header, per packet.
	int declared = 0;
	int classified = 0;
	struct bpf_sock *sk = skb->sk;
	if (sk)
		sk = bpf_sk_fullsock(sk);
	if (sk) {
		struct sock_info *info = bpf_sk_storage_get(&SOCKS, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!info)
			count_error(ERR_STORAGE);
		else if (info->cgroup_id != key.cgroup_id)
			info->cgroup_id = key.cgroup_id; // tells sock_ops (which cannot ask) the socket's cgroup
		__u32 word = 0;
		if (sk->family == 2 /* AF_INET */) {
			word = sk->dst_ip4;
		} else if (sk->family == 10 /* AF_INET6 */) {
			word = sk->dst_ip6[0] ^ sk->dst_ip6[3];
		}
		if (word && info && info->cached_peer == word) {
			key.peer_class = info->traffic_class;
			declared = info->declared;
			classified = 1;
		} else {
			__u16 port = sk->src_port;
			declared = bpf_map_lookup_elem(&PORTS, &port) != 0;
			if (word) {
				if (sk->family == 2) {
					v4_mapped(&peer, sk->dst_ip4);
				} else {
					__u32 a0 = sk->dst_ip6[0], a1 = sk->dst_ip6[1], a2 = sk->dst_ip6[2], a3 = sk->dst_ip6[3];
					__builtin_memcpy(&peer.addr[0], &a0, 4);
					__builtin_memcpy(&peer.addr[4], &a1, 4);
					__builtin_memcpy(&peer.addr[8], &a2, 4);
					__builtin_memcpy(&peer.addr[12], &a3, 4);
				}
				key.peer_class = classify(&peer);
				classified = 1;
				if (info) {
					info->traffic_class = key.peer_class;
					info->declared = declared;
					info->cached_peer = word;
				}
			}
		}
		if (declared)
			key.port = sk->src_port;
	}
	if (!classified)
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

static __always_inline __u32 log2_u32(__u32 v)
{
	__u32 r = 0, shift;
	shift = (v > 0xFFFF) << 4; v >>= shift; r |= shift;
	shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
	shift = (v > 0xF) << 2; v >>= shift; r |= shift;
	shift = (v > 0x3) << 1; v >>= shift; r |= shift;
	r |= (v >> 1);
	return r;
}

static __always_inline __u8 sock_ops_peer(struct bpf_sock_ops *skops)
{
	struct peer_key peer = {};
	if (skops->family == 2 /* AF_INET */) {
		v4_mapped(&peer, skops->remote_ip4);
	} else if (skops->family == 10 /* AF_INET6 */) {
		__u32 a0 = skops->remote_ip6[0], a1 = skops->remote_ip6[1], a2 = skops->remote_ip6[2], a3 = skops->remote_ip6[3];
		__builtin_memcpy(&peer.addr[0], &a0, 4);
		__builtin_memcpy(&peer.addr[4], &a1, 4);
		__builtin_memcpy(&peer.addr[8], &a2, 4);
		__builtin_memcpy(&peer.addr[12], &a3, 4);
	} else {
		return 0;
	}
	return classify(&peer);
}

#define TCP_EV_ESTABLISHED 0
#define TCP_EV_FAILED 1
#define TCP_EV_CLOSED 2
#define TCP_EV_RETRANS 3
#define TCP_EV_RTO 4
#define TCP_EV_RTT 5

static __always_inline void tcp_count(struct sock_info *info, int event, __u32 n)
{
	struct tcp_key key = { .cgroup_id = info->cgroup_id, .peer_class = info->peer_class, .role = info->role };
	struct tcp_val *v = bpf_map_lookup_elem(&TCP, &key);
	if (!v) {
		__u32 zero_key = 0;
		struct tcp_val *zero = bpf_map_lookup_elem(&TCP_ZERO, &zero_key);
		if (!zero)
			return;
		// Losing a race with another CPU's insert is fine: the lookup below finds its entry.
		bpf_map_update_elem(&TCP, &key, zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&TCP, &key);
		if (!v) {
			count_error(ERR_TCP_FULL);
			return;
		}
	}
	switch (event) {
	case TCP_EV_ESTABLISHED: v->established += 1; break;
	case TCP_EV_FAILED: v->failed += 1; break;
	case TCP_EV_CLOSED: v->closed += 1; break;
	case TCP_EV_RETRANS: v->retrans_segs += n; break;
	case TCP_EV_RTO: v->rtos += 1; break;
	case TCP_EV_RTT: {
		__u32 b = n ? log2_u32(n) : 0;
		if (b >= RTT_BUCKETS)
			b = RTT_BUCKETS - 1;
		v->rtt[b] += 1;
		v->rtt_count += 1;
		v->rtt_sum_us += n;
		break;
	}
	}
}

#define TCP_SYN_SENT 2
#define TCP_CLOSE 7
#define NSEC_PER_SEC 1000000000ULL

SEC("sockops")
int netobs_sockops(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 1;
	__u32 op = skops->op;
	struct sock_info *info;
	switch (op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		// Process context: the caller's cgroup is the socket's (cgroup_skb corrects it if
		// the socket was made elsewhere). A listener's storage is cloned into every
		// socket it accepts.
		info = bpf_sk_storage_get(&SOCKS, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!info) {
			count_error(ERR_STORAGE);
			return 1;
		}
		info->cgroup_id = bpf_get_current_cgroup_id();
		info->role = op == BPF_SOCK_OPS_TCP_CONNECT_CB ? ROLE_CLIENT : ROLE_SERVER;
		info->established = 0;
		if (op == BPF_SOCK_OPS_TCP_CONNECT_CB)
			bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		return 1;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		info = bpf_sk_storage_get(&SOCKS, sk, 0, 0);
		if (!info || !info->cgroup_id) {
			count_error(ERR_NO_SOCK_INFO);
			return 1;
		}
		info->role = op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB ? ROLE_CLIENT : ROLE_SERVER;
		info->peer_class = sock_ops_peer(skops);
		info->established = 1;
		info->last_rtt_ns = 0;
		tcp_count(info, TCP_EV_ESTABLISHED, 0);
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RETRANS_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG |
						    BPF_SOCK_OPS_RTT_CB_FLAG);
		return 1;
	}

	// The rest only for sockets seen from their start.
	info = bpf_sk_storage_get(&SOCKS, sk, 0, 0);
	if (!info || !info->cgroup_id)
		return 1;
	switch (op) {
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != TCP_CLOSE)
			break;
		if (info->established) {
			info->established = 0;
			tcp_count(info, TCP_EV_CLOSED, 0);
		} else if (skops->args[0] == TCP_SYN_SENT && info->role == ROLE_CLIENT) {
			info->peer_class = sock_ops_peer(skops);
			tcp_count(info, TCP_EV_FAILED, 0);
		}
		break;
	case BPF_SOCK_OPS_RETRANS_CB:
		// args: seq, segments, error. The kernel's TcpRetransSegs counts successful ones.
		if (skops->args[2] == 0)
			tcp_count(info, TCP_EV_RETRANS, skops->args[1]);
		break;
	case BPF_SOCK_OPS_RTO_CB:
		tcp_count(info, TCP_EV_RTO, 0);
		break;
	case BPF_SOCK_OPS_RTT_CB: {
		// Every ACK with an RTT sample calls us; one histogram sample per connection per
		// second keeps long bulk flows from drowning short ones, and the cost low.
		__u64 now = bpf_ktime_get_ns();
		if (info->last_rtt_ns && now - info->last_rtt_ns < NSEC_PER_SEC)
			break;
		info->last_rtt_ns = now;
		tcp_count(info, TCP_EV_RTT, skops->srtt_us >> 3);
		break;
	}
	}
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
