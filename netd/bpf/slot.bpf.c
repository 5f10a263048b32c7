// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Somna network slot programs (tc / TCX classifiers), loaded by somna-netd
 * with aya. One copy of the object is loaded per netd instance and attached
 * to every slot:
 *
 *   guest_ingress  slot TAP, ingress   frames the guest sends: anti-spoofing
 *   slot_egress    host veth, ingress  traffic leaving a slot: isolation,
 *                                      egress policy, tx accounting
 *   slot_ingress   host veth, egress   traffic entering a slot: exposed
 *                                      ports, rx accounting
 *
 * The host-side programs find their slot by the host veth's ifindex (host
 * ifindexes are unique; the TAP lives in the slot's namespace where they are
 * not). Addresses in globals and maps are in network byte order, exactly as
 * they appear in packets. The layout of every map value/key below is mirrored
 * by #[repr(C)] structs in netd/src/bpf.rs: change both together.
 *
 * The license string must be GPL-compatible: bpf_fib_lookup is GPL-only.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif

/* ---- constants set by the loader (EbpfLoader::override_global) ---------- */

/* The guest side of every slot (identical in all slots, see contract.rs). */
volatile const __u32 GUEST_IP = 0;
volatile const __u32 GATEWAY_IP = 0;
volatile const __u8 GUEST_MAC[6] = {0};
/* Port the gateway forwards to the host's DNS service (0: none). */
volatile const __u16 GATEWAY_DNS_PORT = 0;
/* The host subnet that holds every slot's veth pair, the service address
 * and the health-check address. */
volatile const __u32 SUBNET_ADDR = 0;
volatile const __u32 SUBNET_MASK = 0;
/* Host services the guests may use (DNS) live on this address. */
volatile const __u32 SERVICE_IP = 0;
/* Platform health checks originate here: traffic to or from it does not
 * count as activity. */
volatile const __u32 HEALTH_IP = 0;
/* Forwarded traffic may only leave through this interface (0: any). */
volatile const __u32 EGRESS_IFINDEX = 0;

/* ---- maps ------------------------------------------------------------------ */

#define CFG_ACTIVE 1u   /* claimed by a sandbox; otherwise all traffic drops */
#define CFG_INTERNET 2u /* default route to the outside allowed */
#define CFG_GEN 4u      /* which policy generation is live (0 or 1) */

struct slot_cfg {
	__u32 flags;
	__u32 sandbox_addr; /* slot-side veth address (the slot's NAT address) */
	__u32 host_addr;    /* host-side veth address */
	__u32 pad;
};

struct slot_stats {
	__u64 tx_packets;
	__u64 tx_bytes;
	__u64 rx_packets;
	__u64 rx_bytes;
	__u64 tx_dropped;
	__u64 rx_dropped;
	__u64 last_activity_ns; /* bpf_ktime_get_ns(), CLOCK_MONOTONIC */
	__u64 pad;
};

struct policy_key {
	__u32 prefixlen; /* 32 + CIDR prefix length */
	__u32 slot_gen;  /* big-endian (slot index << 1 | generation) */
	__u32 addr;
};

#define POLICY_ALLOW 1
#define POLICY_DENY 2

struct blocked_key {
	__u32 prefixlen;
	__u32 addr;
};

struct port_key {
	__u32 slot;
	__u16 port; /* host byte order */
	__u8 proto;
	__u8 pad;
};

struct service_key {
	__u16 port; /* host byte order */
	__u8 proto;
	__u8 pad;
};

/* Reasons a packet was dropped, counted globally (per CPU). */
enum drop_reason {
	DROP_MALFORMED = 0,
	DROP_SPOOF_MAC = 1,
	DROP_SPOOF_IP = 2,
	DROP_SPOOF_ARP = 3,
	DROP_PROTOCOL = 4,
	DROP_GATEWAY = 5,
	DROP_UNKNOWN_SLOT = 6,
	DROP_INACTIVE = 7,
	DROP_OTHER_SLOT = 8,
	DROP_HOST = 9,
	DROP_NO_ROUTE = 10,
	DROP_NOT_EGRESS = 11,
	DROP_DENY_LIST = 12,
	DROP_PRIVATE = 13,
	DROP_NO_INTERNET = 14,
	DROP_NOT_EXPOSED = 15,
	DROP_REASONS = 16,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024); /* overridden by the loader */
	__type(key, __u32);        /* host veth ifindex */
	__type(value, __u32);      /* slot index */
} slot_by_ifindex SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct slot_cfg);
} slot_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct slot_stats);
} slot_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct policy_key);
	__type(value, __u8);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 64);
	__type(key, struct blocked_key);
	__type(value, __u8);
} blocked SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct port_key);
	__type(value, __u8);
} exposed SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct service_key);
	__type(value, __u8);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

/* ---- packet parsing ---------------------------------------------------------- */

#define ETH_HLEN_ 14
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10
#define ICMP_ECHOREPLY_ 0
#define ICMP_DEST_UNREACH_ 3
#define ICMP_TIME_EXCEEDED_ 11

struct ipv4_info {
	__u32 saddr;
	__u32 daddr;
	__u8 proto;
	__u8 has_l4;    /* first fragment (or unfragmented) with an L4 header */
	__u8 tcp_flags; /* TCP only */
	__u8 icmp_type; /* ICMP only */
	__u16 sport;    /* host byte order; TCP/UDP only */
	__u16 dport;
};

/* Bytes the header-reading helpers need, read with bpf_skb_load_bytes so
 * that nonlinear skbs (GSO from the TAP) parse too. */
struct arp_eth_ipv4 {
	__be16 hrd;
	__be16 pro;
	__u8 hln;
	__u8 pln;
	__be16 op;
	__u8 sha[6];
	__u8 sip[4];
	__u8 tha[6];
	__u8 tip[4];
} __attribute__((packed));

static __always_inline int count_drop(enum drop_reason reason)
{
	__u32 key = reason;
	__u64 *n = bpf_map_lookup_elem(&drops, &key);
	if (n)
		*n += 1;
	return TC_ACT_SHOT;
}

/* Parses the IPv4 header at offset 14 and, when present, the L4 ports and
 * flags. Returns 0 on success, -1 for a malformed packet. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct ipv4_info *info)
{
	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, ETH_HLEN_, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.version != 4 || ip.ihl < 5)
		return -1;
	info->saddr = ip.saddr;
	info->daddr = ip.daddr;
	info->proto = ip.protocol;
	info->has_l4 = 0;
	info->tcp_flags = 0;
	info->icmp_type = 0;
	info->sport = 0;
	info->dport = 0;
	/* Non-first fragments carry no L4 header. */
	if (ip.frag_off & bpf_htons(0x1fff))
		return 0;
	__u32 l4 = ETH_HLEN_ + ip.ihl * 4;
	if (ip.protocol == IPPROTO_TCP) {
		__u8 hdr[14];
		if (bpf_skb_load_bytes(skb, l4, hdr, sizeof(hdr)) < 0)
			return -1;
		info->sport = ((__u16)hdr[0] << 8) | hdr[1];
		info->dport = ((__u16)hdr[2] << 8) | hdr[3];
		info->tcp_flags = hdr[13];
		info->has_l4 = 1;
	} else if (ip.protocol == IPPROTO_UDP) {
		__u8 hdr[4];
		if (bpf_skb_load_bytes(skb, l4, hdr, sizeof(hdr)) < 0)
			return -1;
		info->sport = ((__u16)hdr[0] << 8) | hdr[1];
		info->dport = ((__u16)hdr[2] << 8) | hdr[3];
		info->has_l4 = 1;
	} else if (ip.protocol == IPPROTO_ICMP) {
		__u8 type;
		if (bpf_skb_load_bytes(skb, l4, &type, 1) < 0)
			return -1;
		info->icmp_type = type;
		info->has_l4 = 1;
	}
	return 0;
}

static __always_inline int mac_is_guest(const __u8 *mac)
{
	return mac[0] == GUEST_MAC[0] && mac[1] == GUEST_MAC[1] && mac[2] == GUEST_MAC[2] &&
	       mac[3] == GUEST_MAC[3] && mac[4] == GUEST_MAC[4] && mac[5] == GUEST_MAC[5];
}

/* ---- guest_ingress: the slot TAP, frames from the guest ---------------------- */

SEC("classifier")
int guest_ingress(struct __sk_buff *skb)
{
	struct ethhdr eth;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return count_drop(DROP_MALFORMED);
	if (!mac_is_guest(eth.h_source))
		return count_drop(DROP_SPOOF_MAC);

	if (eth.h_proto == bpf_htons(ETH_P_ARP)) {
		struct arp_eth_ipv4 arp;
		if (bpf_skb_load_bytes(skb, ETH_HLEN_, &arp, sizeof(arp)) < 0)
			return count_drop(DROP_MALFORMED);
		if (arp.hrd != bpf_htons(1) || arp.pro != bpf_htons(ETH_P_IP) || arp.hln != 6 ||
		    arp.pln != 4)
			return count_drop(DROP_SPOOF_ARP);
		__u32 sip;
		__builtin_memcpy(&sip, arp.sip, 4);
		/* Sender 0.0.0.0 is an address probe (RFC 5227). */
		if (!mac_is_guest(arp.sha) || (sip != GUEST_IP && sip != 0))
			return count_drop(DROP_SPOOF_ARP);
		return TC_ACT_OK;
	}
	if (eth.h_proto != bpf_htons(ETH_P_IP))
		return count_drop(DROP_PROTOCOL);

	struct ipv4_info ip;
	if (parse_ipv4(skb, &ip) < 0)
		return count_drop(DROP_MALFORMED);
	if (ip.saddr != GUEST_IP)
		return count_drop(DROP_SPOOF_IP);
	if (ip.daddr == GATEWAY_IP) {
		/* The gateway itself offers DNS (forwarded to the host's service)
		 * and nothing else. */
		if (GATEWAY_DNS_PORT != 0 && ip.has_l4 &&
		    (ip.proto == IPPROTO_UDP || ip.proto == IPPROTO_TCP) && ip.dport == 53)
			return TC_ACT_OK;
		return count_drop(DROP_GATEWAY);
	}
	return TC_ACT_OK;
}

/* ---- host veth programs ---------------------------------------------------------- */

static __always_inline int in_subnet(__u32 addr)
{
	return (addr & SUBNET_MASK) == SUBNET_ADDR;
}

/* Could be the guest's answer to a connection the host opened (health check,
 * ingress proxy). The host's conntrack-based nftables rules are the stateful
 * check behind this one. */
static __always_inline int reply_like(const struct ipv4_info *ip)
{
	if (!ip->has_l4)
		return 0;
	if (ip->proto == IPPROTO_TCP)
		return (ip->tcp_flags & (TCP_FLAG_ACK | TCP_FLAG_RST)) != 0;
	if (ip->proto == IPPROTO_ICMP)
		return ip->icmp_type == ICMP_ECHOREPLY_ || ip->icmp_type == ICMP_DEST_UNREACH_ ||
		       ip->icmp_type == ICMP_TIME_EXCEEDED_;
	return 0;
}

/* The egress decision for one packet leaving slot `idx`. Returns 0 to pass
 * or a drop reason. */
static __always_inline int egress_verdict(struct __sk_buff *skb, __u32 idx,
					  const struct slot_cfg *cfg,
					  const struct ipv4_info *ip)
{
	__u32 dst = ip->daddr;

	/* 1. The slot network: other sandboxes never, the host only for its
	 *    services and for answers to connections the host opened. */
	if (in_subnet(dst)) {
		if (dst == SERVICE_IP) {
			if (!ip->has_l4)
				return DROP_HOST;
			struct service_key sk = {.port = ip->dport, .proto = ip->proto, .pad = 0};
			if (bpf_map_lookup_elem(&services, &sk))
				return 0;
			return DROP_HOST;
		}
		if (dst == HEALTH_IP || dst == cfg->host_addr)
			return reply_like(ip) ? 0 : DROP_HOST;
		return DROP_OTHER_SLOT;
	}

	/* 2. Anything else the host would deliver locally (any of its own
	 *    addresses, broadcast) is the host too; forwarded traffic must leave
	 *    through the egress interface. */
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.l4_protocol = ip->proto;
	fib.sport = bpf_htons(ip->sport);
	fib.dport = bpf_htons(ip->dport);
	fib.tot_len = 0;
	fib.ifindex = skb->ingress_ifindex;
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = dst;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
		return DROP_HOST;
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return DROP_NO_ROUTE;
	if (EGRESS_IFINDEX != 0 && fib.ifindex != EGRESS_IFINDEX)
		return DROP_NOT_EGRESS;

	/* 3. The sandbox's own lists: the longest matching prefix wins. */
	struct policy_key pk = {
		.prefixlen = 64,
		.slot_gen = bpf_htonl((idx << 1) | ((cfg->flags & CFG_GEN) ? 1 : 0)),
		.addr = dst,
	};
	__u8 *action = bpf_map_lookup_elem(&policy, &pk);
	if (action) {
		if (*action == POLICY_DENY)
			return DROP_DENY_LIST;
		if (*action == POLICY_ALLOW)
			return 0;
	}

	/* 4. Link-local, private and other special ranges, unless allowed. */
	struct blocked_key bk = {.prefixlen = 32, .addr = dst};
	if (bpf_map_lookup_elem(&blocked, &bk))
		return DROP_PRIVATE;

	/* 5. The internet. */
	if (!(cfg->flags & CFG_INTERNET))
		return DROP_NO_INTERNET;
	return 0;
}

/* Host veth, ingress: packets leaving the slot (the sandbox's "tx"). */
SEC("classifier")
int slot_egress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ingress_ifindex;
	__u32 *idxp = bpf_map_lookup_elem(&slot_by_ifindex, &ifindex);
	if (!idxp)
		return count_drop(DROP_UNKNOWN_SLOT);
	__u32 idx = *idxp;
	struct slot_cfg *cfg = bpf_map_lookup_elem(&slot_cfg, &idx);
	struct slot_stats *st = bpf_map_lookup_elem(&slot_stats, &idx);
	if (!cfg || !st)
		return count_drop(DROP_UNKNOWN_SLOT);

	/* ARP between the two veth ends is plumbing: neither policed nor
	 * counted. */
	if (skb->protocol == bpf_htons(ETH_P_ARP))
		return TC_ACT_OK;

	int reason;
	struct ipv4_info ip;
	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		reason = DROP_PROTOCOL;
	} else if (parse_ipv4(skb, &ip) < 0) {
		reason = DROP_MALFORMED;
	} else if (!(cfg->flags & CFG_ACTIVE)) {
		reason = DROP_INACTIVE;
	} else if (ip.saddr != cfg->sandbox_addr) {
		reason = DROP_SPOOF_IP;
	} else {
		reason = egress_verdict(skb, idx, cfg, &ip);
	}
	if (reason) {
		st->tx_dropped += 1;
		return count_drop(reason);
	}
	st->tx_packets += 1;
	st->tx_bytes += skb->len;
	if (ip.daddr != HEALTH_IP)
		st->last_activity_ns = bpf_ktime_get_ns();
	return TC_ACT_OK;
}

/* Host veth, egress: packets entering the slot (the sandbox's "rx"). */
SEC("classifier")
int slot_ingress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	__u32 *idxp = bpf_map_lookup_elem(&slot_by_ifindex, &ifindex);
	if (!idxp)
		return count_drop(DROP_UNKNOWN_SLOT);
	__u32 idx = *idxp;
	struct slot_cfg *cfg = bpf_map_lookup_elem(&slot_cfg, &idx);
	struct slot_stats *st = bpf_map_lookup_elem(&slot_stats, &idx);
	if (!cfg || !st)
		return count_drop(DROP_UNKNOWN_SLOT);

	if (skb->protocol == bpf_htons(ETH_P_ARP))
		return TC_ACT_OK;

	int reason = 0;
	struct ipv4_info ip;
	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		reason = DROP_PROTOCOL;
	} else if (parse_ipv4(skb, &ip) < 0) {
		reason = DROP_MALFORMED;
	} else if (!(cfg->flags & CFG_ACTIVE)) {
		reason = DROP_INACTIVE;
	} else if (ip.proto == IPPROTO_TCP && ip.has_l4 &&
		   (ip.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
		/* A new inbound connection: only to ports the sandbox exposes. */
		struct port_key pk = {.slot = idx, .port = ip.dport, .proto = IPPROTO_TCP, .pad = 0};
		if (!bpf_map_lookup_elem(&exposed, &pk))
			reason = DROP_NOT_EXPOSED;
	}
	if (reason) {
		st->rx_dropped += 1;
		return count_drop(reason);
	}
	st->rx_packets += 1;
	st->rx_bytes += skb->len;
	if (ip.saddr != HEALTH_IP)
		st->last_activity_ns = bpf_ktime_get_ns();
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
