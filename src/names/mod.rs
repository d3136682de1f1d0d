//! Names for remote ends: which host name the machine last looked up for an address, learnt
//! from the DNS answers it receives ([`sniff`]), so a policy can say `conn.remote_host` and
//! `status`/`top` can show `video.example.com` rather than an address.
//!
//! A name is a hint, not an identity: an address serves many names (a CDN), the latest answer
//! wins, and lookups the machine does not make in the clear (DNS over HTTPS or TLS, a browser's
//! own resolver) teach nothing. A name stays while connections to its address are seen, so a
//! connection does not lose its name, and its class, when the answer's TTL runs out.

pub mod sniff;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Answers kept at most: about 100 bytes each, 6.5 MB in all.
pub const MAX_NAMES: usize = 65_536;
/// The shortest an answer is kept, whatever its TTL (many CDNs answer with 20-60 s): a
/// connection opened from it is usually seen by a cycle well within this.
pub const MIN_KEEP: Duration = Duration::from_secs(120);
/// The longest an answer is kept without a connection to its address.
pub const MAX_KEEP: Duration = Duration::from_secs(24 * 3600);
/// How long a name outlives the last connection seen to its address.
pub const KEEP_AFTER_USE: Duration = Duration::from_secs(600);

/// The kernel edge of names: where the cycle asks for the names of the addresses its
/// connections go to. [`sniff::DnsSniffer`] learns them from the wire; [`NoNames`] knows none
/// (no packet socket here, or `plan`/`simulate`, whose fixtures carry their own names).
pub trait NameSource: Send {
    /// The name last looked up for `ip`; a hit keeps the name while the address is in use.
    fn name_of(&mut self, ip: IpAddr, now: Instant) -> Option<Arc<str>>;
}

/// Knows no names.
#[derive(Debug, Default)]
pub struct NoNames;

impl NameSource for NoNames {
    fn name_of(&mut self, _: IpAddr, _: Instant) -> Option<Arc<str>> {
        None
    }
}

/// A fixed map of names, for tests of the cycle.
#[derive(Debug, Default)]
pub struct FixedNames(pub HashMap<IpAddr, Arc<str>>);

impl NameSource for FixedNames {
    fn name_of(&mut self, ip: IpAddr, _: Instant) -> Option<Arc<str>> {
        self.0.get(&ip).cloned()
    }
}

#[derive(Debug, Clone)]
struct Entry {
    name: Arc<str>,
    until: Instant,
}

/// Address → name, bounded in time and size: an entry goes when its keep time passes, and
/// when [`MAX_NAMES`] are held the one due first gives way to a new answer.
#[derive(Debug, Default)]
pub struct NameCache {
    by_ip: HashMap<IpAddr, Entry>,
    /// `(until, ip)` of every entry, so the one due first is found without a scan.
    due: BTreeSet<(Instant, IpAddr)>,
    limit: usize,
}

impl NameCache {
    pub fn new(limit: usize) -> NameCache {
        NameCache {
            limit: limit.max(1),
            ..NameCache::default()
        }
    }

    /// Records that `name` resolved to `ip` with this TTL.
    pub fn learn(&mut self, ip: IpAddr, name: &str, ttl: Duration, now: Instant) {
        self.expire(now);
        let until = now + ttl.clamp(MIN_KEEP, MAX_KEEP);
        let name: Arc<str> = match self.by_ip.get(&ip) {
            Some(e) if &*e.name == name => e.name.clone(),
            _ => name.into(),
        };
        if !self.by_ip.contains_key(&ip)
            && self.by_ip.len() >= self.limit
            && let Some(first) = self.due.pop_first()
        {
            self.by_ip.remove(&first.1);
        }
        self.set(ip, Entry { name, until });
    }

    /// The name for `ip`, kept at least [`KEEP_AFTER_USE`] longer.
    pub fn name_of(&mut self, ip: IpAddr, now: Instant) -> Option<Arc<str>> {
        self.expire(now);
        let entry = self.by_ip.get(&ip)?.clone();
        let until = entry.until.max(now + KEEP_AFTER_USE);
        let name = entry.name.clone();
        self.set(ip, Entry { until, ..entry });
        Some(name)
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    fn set(&mut self, ip: IpAddr, entry: Entry) {
        if let Some(old) = self.by_ip.get(&ip) {
            self.due.remove(&(old.until, ip));
        }
        self.due.insert((entry.until, ip));
        self.by_ip.insert(ip, entry);
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(until, ip)) = self.due.first()
            && until <= now
        {
            self.due.pop_first();
            self.by_ip.remove(&ip);
        }
    }
}

/// A cache shared between the thread that learns and the cycle that asks.
pub type SharedCache = Arc<Mutex<NameCache>>;

/// Whether `host` is `pattern`'s domain: `example.com` matches it and every name under it,
/// `*.example.com` only the names under it. Case and a final dot do not count.
pub fn match_domain(host: &str, pattern: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let (domain, only_under) = match pattern.strip_prefix("*.") {
        Some(d) => (d, true),
        None => (pattern.as_str(), false),
    };
    if domain.is_empty() {
        return false;
    }
    let under = host.len() > domain.len()
        && host.ends_with(domain)
        && host.as_bytes()[host.len() - domain.len() - 1] == b'.';
    under || (!only_under && host == domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_name_lasts_its_keep_time_and_longer_while_used() {
        let t0 = Instant::now();
        let mut c = NameCache::new(10);
        c.learn(ip("192.0.2.1"), "a.example", Duration::from_secs(30), t0);
        // A 30 s TTL is kept for MIN_KEEP.
        assert_eq!(
            c.name_of(ip("192.0.2.1"), t0 + Duration::from_secs(100))
                .as_deref(),
            Some("a.example")
        );
        // Used at 100 s, it lasts until 100 s + KEEP_AFTER_USE.
        let later = t0 + Duration::from_secs(100) + KEEP_AFTER_USE - Duration::from_secs(1);
        assert_eq!(
            c.name_of(ip("192.0.2.1"), later).as_deref(),
            Some("a.example")
        );
        let gone = later + KEEP_AFTER_USE + Duration::from_secs(1);
        assert_eq!(c.name_of(ip("192.0.2.1"), gone), None);
        assert!(c.is_empty());
    }

    #[test]
    fn a_full_cache_drops_the_entry_due_first() {
        let t0 = Instant::now();
        let mut c = NameCache::new(2);
        c.learn(ip("192.0.2.1"), "short", Duration::from_secs(200), t0);
        c.learn(ip("192.0.2.2"), "long", Duration::from_secs(900), t0);
        c.learn(ip("192.0.2.3"), "new", Duration::from_secs(300), t0);
        assert_eq!(c.len(), 2);
        assert_eq!(c.name_of(ip("192.0.2.1"), t0), None);
        assert_eq!(c.name_of(ip("192.0.2.2"), t0).as_deref(), Some("long"));
        assert_eq!(c.name_of(ip("192.0.2.3"), t0).as_deref(), Some("new"));
        // A new answer for an address held replaces its name and takes no room.
        c.learn(ip("192.0.2.3"), "renamed", Duration::from_secs(300), t0);
        assert_eq!(c.len(), 2);
        assert_eq!(c.name_of(ip("192.0.2.3"), t0).as_deref(), Some("renamed"));
    }

    #[test]
    fn domains_match_themselves_and_what_is_under_them() {
        assert!(match_domain("example.com", "example.com"));
        assert!(match_domain("r3.cdn.Example.com.", "example.com"));
        assert!(!match_domain("badexample.com", "example.com"));
        assert!(match_domain("r3.googlevideo.com", "*.googlevideo.com"));
        assert!(!match_domain("googlevideo.com", "*.googlevideo.com"));
        assert!(!match_domain("example.com", "*."));
        assert!(!match_domain("example.com", ""));
    }
}
