// Programs that do nothing but let the packet or socket event through, attached the way the
// netobs programs are. bench-net runs them as its anchor: what one cgroup_skb or sock_ops
// run costs on the machine at hand before any work is done (entry, exit, the run-time
// accounting itself), next to what Hearth's programs cost.

#define SEC(name) __attribute__((section(name), used))

struct __sk_buff;
struct bpf_sock_ops;

SEC("cgroup_skb/ingress")
int null_ingress(struct __sk_buff *skb)
{
	return 1;
}

SEC("cgroup_skb/egress")
int null_egress(struct __sk_buff *skb)
{
	return 1;
}

SEC("sockops")
int null_sockops(struct bpf_sock_ops *ops)
{
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
