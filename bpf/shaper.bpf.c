// SPDX-License-Identifier: MIT OR GPL-2.0
//
// shaper's first-packet classifier: the kernel side. Loaded by src/classify/bpf.rs (aya); built
// by bpf/build.sh into bpf/shaper.bpf.o, which is committed so `cargo build` needs no clang.
//
// Every packet of a socket created in the attached cgroup gets skb->priority = an HTB classid
// (5a:minor), which htb_classify() uses before any filter runs:
//   upload    cgroup_skb/egress on the cgroup;
//   download  tcx (or cls_bpf) on the interface's ingress, ahead of the mirred redirect to the
//             IFB, which looks the local socket up (the priority survives the redirect).
// The class comes from conn_class[cookie], else proc_class[owner tgid], else stays untouched
// (the HTB's default class). No program here ever drops a packet.
//
// A socket neither has yet (its process never decided: a new process's first connections) is
// held for at most HOLD_NS after its creation in the holding leaf the daemon names in
// `hold_class` (0: none), limited like the policy's most limited connection, so it does not run
// unlimited while the daemon decides it (a few ms). After the window, decided or not, the lookup
// above applies alone: if the daemon stops deciding, new sockets are held for the window and then
// go unshaped, never dropped.
//
// Owners are recorded at socket creation (cgroup/sock_create runs in the creating process) in
// socket storage cloned to accepted sockets; each new socket is reported once, on its first
// packet either way, through the `events` ring buffer. Bytes are counted per socket cookie.
//
// Under a flood of new sockets the ring buffer keeps room for what only the daemon can decide:
// past DEFER_ABOVE unread bytes, a socket whose process already has a class here is classified
// by that class and not reported (the next scan finds it); a socket whose report found the
// buffer full is reported again on a later packet. Both are counted in `report_stats`.
//
// An exec drops the process's class for new connections (the program it ran before was judged,
// not this one) and is reported as a struct exec_event, so the daemon reads the process again.
//
// Bytes are counted only on the shaped interface (`shaped_ifaces`; loopback and other links are
// not the bill), per segment at the IP layer: a GSO/GRO packet counts its headers once per
// segment it stands for. The egress hook runs before the qdiscs, so it also counts what the
// shaper's own queues then drop: a TCP connection's figures are therefore its tcp_info's (payload
// acknowledged and received, plus headers per segment, as the daemon's scan reads them too), its
// counter here only saying that it crossed the shaped interface. A socket's totals leave with
// it: when a TCP connection reaches TCP_CLOSE (its last data sent, a sockops state callback) or
// a UDP socket is released, a struct close_event carries its final counts, owner and classes,
// and its counter is deleted, so a process that lived less than a cycle, and every connection's
// tail, are charged.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define TCP_LISTEN 10
/* TCX_NEXT (tcx) and TC_ACT_UNSPEC (cls_bpf) are both -1: "go on with the next program". */
#define NEXT (-1)
#define ALLOW 1

#define OWNER_KNOWN 1u
#define OWNER_REPORTED 2u
#define OWNER_DEFERRED 4u
#define OWNER_LOST 8u
/* A TCP socket whose close is reported from its TCP_CLOSE state callback, not its release. */
#define OWNER_STATE_CB 16u

/* Unread bytes in `events` past which sockets of processes that have a class are not reported
 * (1/16 of the buffer: about 700 events, so a new process's report waits behind at most those). */
#define DEFER_ABOVE (64 * 1024)

/* How long after its creation an undecided socket is held in the holding leaf: 20-30 times the
 * fast path's median decision (3-9 ms), short enough that a daemon that no longer decides costs a
 * new connection no more than that. */
#define HOLD_NS (100ULL * 1000 * 1000)

/* A connection's (or a process's) classes; 0 = no class, leave skb->priority alone. */
struct classes {
	__u32 up;
	__u32 down;
};

/* Per-socket storage. Cloned from a listener to the sockets it accepts (BPF_F_CLONE). */
struct owner {
	__u64 cookie; /* this socket's cookie (refreshed after a clone) */
	__u64 cgroup_id;
	__u32 tgid;
	__u32 uid;
	__u32 flags; /* OWNER_* */
	__u32 _pad;
	char comm[16];
	__u64 created_ns; /* CLOCK_MONOTONIC at creation (an accepted socket: when established) */
};

struct counters {
	__u64 up;
	__u64 down;
};

/* One new socket, reported once. Addresses in network order, ports in host order. */
struct event {
	__u64 cookie;
	__u64 cgroup_id;
	__u64 ktime_ns; /* CLOCK_MONOTONIC when the event was written */
	__u32 tgid;
	__u32 uid;
	char comm[16];
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u16 local_port;
	__u16 remote_port;
	__u16 family;
	__u8 protocol;
	__u8 ingress; /* 1: the socket's first packet was inbound */
};

/* A process called exec. Told from a struct event in the ring buffer by its size. */
struct exec_event {
	__u64 ktime_ns;
	__u32 tgid;
	__u32 _pad;
};

/* A socket's final counts, reported once when it closes. Told from the others by its size. */
struct close_event {
	__u64 cookie;
	__u64 cgroup_id; /* 0 when the owner is not known (a socket older than the programs) */
	__u64 up;
	__u64 down;
	__u32 tgid; /* 0 when the owner is not known */
	__u32 uid;
	__u32 class_up; /* the classes its packets had at the end, 0 = none (the default class) */
	__u32 class_down;
	char comm[16];
	__u8 protocol;
	__u8 _pad[7];
};

/* Reports that could not be made at once, since the programs were attached. */
struct report_stats {
	__u64 deferred; /* sockets not reported (yet) because the buffer was filling */
	__u64 lost;     /* sockets whose report found the buffer full (retried later) */
	__u64 exec_lost; /* exec reports that found the buffer full */
	__u64 close_lost; /* closes that found the buffer full or filling: their bytes below */
	__u64 close_lost_up;
	__u64 close_lost_down;
};

/* Puts the ring buffer's records in the object's BTF, which otherwise describes only the types
 * that maps and programs' arguments use (a ring buffer has no value type): the daemon's copies of
 * all the structs above are checked against this BTF field by field (src/classify/bpf/layout.rs).
 * A variable (by value: BTF describes a struct only pointed to as a forward declaration) in a
 * section of its own that the loader skips, like the licence: no map, no code. */
struct {
	struct event event;
	struct exec_event exec_event;
	struct close_event close_event;
} ring_records SEC(".layout");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct classes);
} conn_class SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct classes);
} proc_class SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct owner);
} owners SEC(".maps");

/* The holding leaf's classes, per direction (0: no holding). Written by the daemon. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct classes);
} hold_class SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, __u64);
	__type(value, struct counters);
} sock_bytes SEC(".maps");

/* The shaped interfaces' indexes (in the daemon's network namespace): bytes are counted there
 * only. Written by the daemon. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u8);
} shaped_ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct report_stats);
} report_stats SEC(".maps");

static __always_inline struct report_stats *stats(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&report_stats, &zero);
}

static __always_inline int is_tcp_or_udp(__u32 protocol)
{
	return protocol == IPPROTO_TCP || protocol == IPPROTO_UDP;
}

/* The class for one direction: the connection's, else its owner's "new connections" class. */
static __always_inline __u32 class_of(__u64 cookie, struct owner *o, int down)
{
	struct classes *c = bpf_map_lookup_elem(&conn_class, &cookie);
	__u32 id = 0;

	if (c)
		id = down ? c->down : c->up;
	if (!id && o && (o->flags & OWNER_KNOWN)) {
		__u32 tgid = o->tgid;

		c = bpf_map_lookup_elem(&proc_class, &tgid);
		if (c)
			id = down ? c->down : c->up;
	}
	return id;
}

/* The holding leaf for a socket without a class (class_of gave 0): while it is younger than
 * HOLD_NS and neither it nor its process has an entry, else 0. */
static __always_inline __u32 hold_of(__u64 cookie, struct owner *o, int down)
{
	__u32 zero = 0;

	if (!o || !(o->flags & OWNER_KNOWN) || bpf_ktime_get_ns() - o->created_ns > HOLD_NS)
		return 0;
	struct classes *h = bpf_map_lookup_elem(&hold_class, &zero);
	__u32 id = h ? (down ? h->down : h->up) : 0;
	__u32 tgid = o->tgid;

	if (!id || bpf_map_lookup_elem(&conn_class, &cookie) ||
	    bpf_map_lookup_elem(&proc_class, &tgid))
		return 0;
	return id;
}

/* The IP and transport headers' length of a packet (skb->data is the network header here). */
static __always_inline __u32 header_len(struct __sk_buff *skb, __u32 protocol)
{
	__u8 b;
	__u32 l3;

	if (bpf_skb_load_bytes(skb, 0, &b, 1))
		return 0;
	if ((b >> 4) == 4)
		l3 = (b & 0xf) * 4;
	else if ((b >> 4) == 6)
		l3 = 40;
	else
		return 0;
	if (protocol == IPPROTO_UDP)
		return l3 + 8;
	if (bpf_skb_load_bytes(skb, l3 + 12, &b, 1))
		return l3 + 20;
	return l3 + (b >> 4) * 4;
}

/* The packet's bytes on the wire at the IP layer, 0 when it does not cross a shaped interface. */
static __always_inline __u32 wire_len(struct __sk_buff *skb, __u32 protocol)
{
	__u32 ifindex = skb->ifindex;
	__u32 len = skb->len;
	__u32 segs = skb->gso_segs;

	if (!bpf_map_lookup_elem(&shaped_ifaces, &ifindex))
		return 0;
	if (segs > 1 && segs < 65536)
		len += (segs - 1) * header_len(skb, protocol);
	return len;
}

static __always_inline void count(__u64 cookie, __u32 len, int down)
{
	if (!len)
		return;
	struct counters *c = bpf_map_lookup_elem(&sock_bytes, &cookie);

	if (!c) {
		struct counters zero = {};

		bpf_map_update_elem(&sock_bytes, &cookie, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&sock_bytes, &cookie);
		if (!c)
			return;
	}
	if (down)
		__sync_fetch_and_add(&c->down, len);
	else
		__sync_fetch_and_add(&c->up, len);
}

/* Reports a socket the first time one of its packets is seen, if its owner is known. */
static __always_inline void report_once(struct bpf_sock *sk, struct owner *o, __u64 cookie,
					__u8 ingress)
{
	if (!(o->flags & OWNER_KNOWN) || (o->flags & OWNER_REPORTED) || sk->state == TCP_LISTEN)
		return;
	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > DEFER_ABOVE) {
		__u32 tgid = o->tgid;

		if (bpf_map_lookup_elem(&proc_class, &tgid)) {
			struct report_stats *st = stats();

			if (st && !(__sync_fetch_and_or(&o->flags, OWNER_DEFERRED) & OWNER_DEFERRED))
				__sync_fetch_and_add(&st->deferred, 1);
			return;
		}
	}
	if (__sync_fetch_and_or(&o->flags, OWNER_REPORTED) & OWNER_REPORTED)
		return;
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		struct report_stats *st = stats();

		/* Not reported after all: a later packet tries again. */
		__sync_fetch_and_and(&o->flags, ~OWNER_REPORTED);
		if (st && !(__sync_fetch_and_or(&o->flags, OWNER_LOST) & OWNER_LOST))
			__sync_fetch_and_add(&st->lost, 1);
		return;
	}
	e->cookie = cookie;
	e->cgroup_id = o->cgroup_id;
	e->tgid = o->tgid;
	e->uid = o->uid;
	__builtin_memcpy(e->comm, o->comm, sizeof(e->comm));
	e->family = sk->family;
	e->protocol = sk->protocol;
	e->ingress = ingress;
	e->local_port = sk->src_port;
	e->remote_port = bpf_ntohs(sk->dst_port);
	if (sk->family == AF_INET6) {
		e->local_ip[0] = sk->src_ip6[0];
		e->local_ip[1] = sk->src_ip6[1];
		e->local_ip[2] = sk->src_ip6[2];
		e->local_ip[3] = sk->src_ip6[3];
		e->remote_ip[0] = sk->dst_ip6[0];
		e->remote_ip[1] = sk->dst_ip6[1];
		e->remote_ip[2] = sk->dst_ip6[2];
		e->remote_ip[3] = sk->dst_ip6[3];
	} else {
		e->local_ip[0] = sk->src_ip4;
		e->local_ip[1] = 0;
		e->local_ip[2] = 0;
		e->local_ip[3] = 0;
		e->remote_ip[0] = sk->dst_ip4;
		e->remote_ip[1] = 0;
		e->remote_ip[2] = 0;
		e->remote_ip[3] = 0;
	}
	e->ktime_ns = bpf_ktime_get_ns();
	bpf_ringbuf_submit(e, 0);
}

SEC("cgroup/sock_create")
int sock_create(struct bpf_sock *sk)
{
	if (!is_tcp_or_udp(sk->protocol))
		return ALLOW;
	struct owner *o = bpf_sk_storage_get(&owners, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o)
		return ALLOW;
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	o->cookie = bpf_get_socket_cookie(sk);
	o->cgroup_id = bpf_get_current_cgroup_id();
	o->tgid = pid_tgid >> 32;
	o->uid = (__u32)bpf_get_current_uid_gid();
	o->flags = OWNER_KNOWN;
	bpf_get_current_comm(o->comm, sizeof(o->comm));
	o->created_ns = bpf_ktime_get_ns();
	return ALLOW;
}

/* Both cgroup_skb programs: count, report, and (egress) classify. Sockets that predate the
 * programs get storage without an owner, so the download side can still find their cookie. */
static __always_inline int on_skb(struct __sk_buff *skb, int down)
{
	struct bpf_sock *sk = skb->sk;

	if (!sk)
		return ALLOW;
	sk = bpf_sk_fullsock(sk);
	if (!sk || !is_tcp_or_udp(sk->protocol))
		return ALLOW;
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct owner *o = bpf_sk_storage_get(&owners, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	count(cookie, wire_len(skb, sk->protocol), down);
	if (o) {
		if (o->cookie != cookie && sk->state != TCP_LISTEN)
			o->cookie = cookie;
		report_once(sk, o, cookie, down);
	}
	if (!down) {
		__u32 id = class_of(cookie, o, 0);

		if (!id)
			id = hold_of(cookie, o, 0);
		if (id)
			skb->priority = id;
	}
	return ALLOW;
}

SEC("cgroup_skb/egress")
int skb_egress(struct __sk_buff *skb)
{
	return on_skb(skb, 0);
}

SEC("cgroup_skb/ingress")
int skb_ingress(struct __sk_buff *skb)
{
	return on_skb(skb, 1);
}

/* IP and TCP headers (with timestamps) of one segment: what the daemon adds to tcp_info's
 * payload counts per segment (src/scan/diag.rs). */
#define TCP_HEADERS_V4 52
#define TCP_HEADERS_V6 72

/* A socket's final counts, owner and classes, once; its counter goes. Nothing counted on the
 * shaped interface: nothing to report. `tcp`: the counts to report instead of the counter's. */
static __always_inline void report_close(__u64 cookie, struct owner *o, __u8 protocol,
					 struct counters *tcp)
{
	struct counters *c = bpf_map_lookup_elem(&sock_bytes, &cookie);

	if (!c)
		return;
	__u64 up = tcp ? tcp->up : c->up;
	__u64 down = tcp ? tcp->down : c->down;

	bpf_map_delete_elem(&sock_bytes, &cookie);
	/* Past DEFER_ABOVE the room is kept for new sockets' reports (a flood of short connections
	 * closes as fast as it opens): this close's bytes go unattributed, counted as lost. */
	struct close_event *e = 0;

	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) <= DEFER_ABOVE)
		e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		struct report_stats *st = stats();

		if (st) {
			__sync_fetch_and_add(&st->close_lost, 1);
			__sync_fetch_and_add(&st->close_lost_up, up);
			__sync_fetch_and_add(&st->close_lost_down, down);
		}
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->cookie = cookie;
	e->up = up;
	e->down = down;
	e->protocol = protocol;
	e->class_up = class_of(cookie, o, 0);
	e->class_down = class_of(cookie, o, 1);
	if (o && (o->flags & OWNER_KNOWN)) {
		e->cgroup_id = o->cgroup_id;
		e->tgid = o->tgid;
		e->uid = o->uid;
		__builtin_memcpy(e->comm, o->comm, sizeof(e->comm));
	}
	bpf_ringbuf_submit(e, 0);
}

/* Established: an accepted socket's storage is a copy of its listener's, so it gets its own
 * cookie before its first inbound data packet is classified on the interface; and either way
 * the connection's close is reported from its TCP_CLOSE state, after its last data was sent
 * (data a process wrote before close() is still sent, and counted, after its release). */
SEC("sockops")
int sock_ops(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct owner *o;

	if (!sk)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		o = bpf_sk_storage_get(&owners, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!o)
			return 1;
		/* An accepted socket is new now, not when its listener was created. */
		if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
			o->cookie = bpf_get_socket_cookie(skops);
			o->created_ns = bpf_ktime_get_ns();
		}
		if (!bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
						   BPF_SOCK_OPS_STATE_CB_FLAG))
			__sync_fetch_and_or(&o->flags, OWNER_STATE_CB);
		return 1;
	case BPF_SOCK_OPS_STATE_CB: {
		if (skops->args[1] != BPF_TCP_CLOSE)
			return 1;
		__u64 headers = skops->family == AF_INET6 ? TCP_HEADERS_V6 : TCP_HEADERS_V4;
		struct counters tcp = {
			.up = skops->bytes_acked + (__u64)skops->segs_out * headers,
			.down = skops->bytes_received + (__u64)skops->segs_in * headers,
		};

		o = bpf_sk_storage_get(&owners, sk, 0, 0);
		report_close(bpf_get_socket_cookie(skops), o, IPPROTO_TCP, &tcp);
		return 1;
	}
	}
	return 1;
}

/* Release: a UDP socket's close (and a TCP socket's whose state is not followed: one older than
 * the programs). */
SEC("cgroup/sock_release")
int sock_release(struct bpf_sock *sk)
{
	if (!is_tcp_or_udp(sk->protocol))
		return ALLOW;
	struct owner *o = bpf_sk_storage_get(&owners, sk, 0, 0);

	if (sk->protocol == IPPROTO_TCP && o && (o->flags & OWNER_STATE_CB))
		return ALLOW;
	/* A TCP socket older than the programs: its counter's figures, the best there is here. */
	report_close(bpf_get_socket_cookie(sk), o, sk->protocol, 0);
	return ALLOW;
}

/* Download: find the local socket of an inbound packet and set the IFB's class. Headers are read
 * relative to the network header, so Ethernet and raw-IP devices (WireGuard, PPP) both work. */
SEC("classifier")
int tc_ingress(struct __sk_buff *skb)
{
	struct bpf_sock_tuple t = {};
	__be16 ports[2];
	__u32 size, l4;
	__u8 proto;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes_relative(skb, 0, &ip, sizeof(ip), BPF_HDR_START_NET))
			return NEXT;
		if (ip.frag_off & bpf_htons(0x1fff))
			return NEXT;
		proto = ip.protocol;
		l4 = ip.ihl * 4;
		t.ipv4.saddr = ip.saddr;
		t.ipv4.daddr = ip.daddr;
		size = sizeof(t.ipv4);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes_relative(skb, 0, &ip6, sizeof(ip6), BPF_HDR_START_NET))
			return NEXT;
		proto = ip6.nexthdr;
		l4 = sizeof(ip6);
		__builtin_memcpy(t.ipv6.saddr, &ip6.saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, &ip6.daddr, 16);
		size = sizeof(t.ipv6);
	} else {
		return NEXT;
	}
	if (!is_tcp_or_udp(proto))
		return NEXT;
	if (bpf_skb_load_bytes_relative(skb, l4 & 0xff, ports, sizeof(ports), BPF_HDR_START_NET))
		return NEXT;
	/* The packet's own tuple: source = the remote end, destination = the local socket. */
	if (size == sizeof(t.ipv4)) {
		t.ipv4.sport = ports[0];
		t.ipv4.dport = ports[1];
	} else {
		t.ipv6.sport = ports[0];
		t.ipv6.dport = ports[1];
	}
	struct bpf_sock *sk = proto == IPPROTO_TCP
		? bpf_sk_lookup_tcp(skb, &t, size, BPF_F_CURRENT_NETNS, 0)
		: bpf_sk_lookup_udp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return NEXT;
	struct owner *o = bpf_sk_storage_get(&owners, sk, 0, 0);
	__u32 id = 0;

	if (o) {
		id = class_of(o->cookie, o, 1);
		if (!id)
			id = hold_of(o->cookie, o, 1);
	}
	bpf_sk_release(sk);
	if (id)
		skb->priority = id;
	return NEXT;
}

/* exec: the process's class for new connections was decided for the program it ran before. */
SEC("raw_tracepoint/sched_process_exec")
int on_exec(void *ctx)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	if (!bpf_map_lookup_elem(&proc_class, &tgid))
		return 0;
	bpf_map_delete_elem(&proc_class, &tgid);
	struct exec_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		struct report_stats *st = stats();

		if (st)
			__sync_fetch_and_add(&st->exec_lost, 1);
		return 0;
	}
	e->ktime_ns = bpf_ktime_get_ns();
	e->tgid = tgid;
	e->_pad = 0;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* exit: a process's class for new connections goes with it (the daemon keeps it while the
 * process lives, connections or not, so its next connection is classified at once, and a flood
 * of its sockets can be deferred); its pid may be reused by another program. */
SEC("raw_tracepoint/sched_process_exit")
int on_exit(void *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32;

	if ((__u32)pid_tgid == tgid)
		bpf_map_delete_elem(&proc_class, &tgid);
	return 0;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
