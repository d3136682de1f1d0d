//! Failures at start that no amount of waiting cures: `shaper run` exits at once with the fix
//! and an exit status of its own ([`StartError::exit_code`]) instead of logging the same error
//! every cycle. A missing interface is not one of them: it is waited for (a ppp link redials, a
//! USB modem is plugged in later), and the log names the interfaces that do exist.

use super::{Daemon, ShapingState};

/// Why `shaper run` will not start. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "shaper run needs CAP_NET_ADMIN to install qdiscs and filters, and this process (uid \
         {uid}) does not have it. Run it as root (`sudo shaper run`), or grant the \
         capabilities: in a systemd unit `AmbientCapabilities=CAP_NET_ADMIN CAP_BPF \
         CAP_PERFMON CAP_SYS_PTRACE CAP_DAC_READ_SEARCH` (CAP_BPF and CAP_PERFMON for the \
         first-packet classifier, the last two to see other users' processes); \
         `--dry-run` needs none"
    )]
    NoCapability { uid: u32 },
    #[error(
        "nothing can be shaped: {}. Remove the other qdisc, or start shaper with --replace to \
         replace it",
        .refused.join("; ")
    )]
    NothingToShape {
        /// Each refused interface's reason.
        refused: Vec<String>,
    },
}

impl StartError {
    /// The exit status for this failure, after the LSB init-script codes: 4 "insufficient
    /// privilege", 6 "not configured" (nothing to shape as configured). Under systemd,
    /// `RestartPreventExitStatus=4` keeps a start that cannot succeed from being retried.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::NoCapability { .. } => 4,
            StartError::NothingToShape { .. } => 6,
        }
    }
}

/// Fails unless this process may change the network configuration (CAP_NET_ADMIN in its
/// effective set), which every qdisc, filter and IFB operation needs.
pub fn require_net_admin() -> Result<(), StartError> {
    let has = rustix::thread::capabilities(None)
        .map(|sets| {
            sets.effective
                .contains(rustix::thread::CapabilitySet::NET_ADMIN)
        })
        // Where capabilities cannot be read, the first operation says what is missing.
        .unwrap_or(true);
    if has {
        Ok(())
    } else {
        Err(StartError::NoCapability {
            uid: rustix::process::geteuid().as_raw(),
        })
    }
}

impl Daemon {
    /// After the first cycle: when every interface was refused (another program's qdisc is in
    /// the way), nothing will ever be shaped without the user acting, so the daemon should not
    /// start. An interface that is waiting, shaping or failing (which may be transient) lets
    /// it run.
    pub fn nothing_to_shape(&self) -> Option<StartError> {
        let refused: Vec<String> = self
            .interfaces
            .iter()
            .map(|i| match &i.state {
                ShapingState::Refused(why) => Some(why.clone()),
                _ => None,
            })
            .collect::<Option<_>>()?;
        (!refused.is_empty()).then_some(StartError::NothingToShape { refused })
    }
}

/// The network interfaces of this network namespace, by name, sorted.
pub fn existing_interfaces() -> Vec<String> {
    let mut names: Vec<String> = nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .map(|i| i.name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The existing interface closest to `wanted`, if it is close enough to be a typo (at most two
/// edits, a swap of neighbours counting as one, and fewer edits than the name has letters).
pub fn close_match<'a>(wanted: &str, existing: &'a [String]) -> Option<&'a str> {
    existing
        .iter()
        .map(|name| (strsim::osa_distance(wanted, name), name))
        .filter(|&(d, _)| d <= 2 && d < wanted.chars().count())
        .min()
        .map(|(_, name)| name.as_str())
}

/// `"; interfaces here: lo, veth0; did you mean veth0?"` for a missing interface `wanted`.
pub fn existing_interfaces_hint(wanted: &str) -> String {
    let existing = existing_interfaces();
    if existing.is_empty() {
        return String::new();
    }
    let guess = close_match(wanted, &existing)
        .map(|name| format!("; did you mean {name}?"))
        .unwrap_or_default();
    format!("; interfaces here: {}{guess}", existing.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_finds_the_interface_meant() {
        let existing: Vec<String> = ["eth0", "lo", "wlan0", "veth0"].map(String::from).to_vec();
        assert_eq!(close_match("eht0", &existing), Some("eth0"));
        assert_eq!(close_match("wlan1", &existing), Some("wlan0"));
        assert_eq!(close_match("ppp0", &existing), None, "no guess is better");
        assert_eq!(close_match("l", &existing), None, "too short to guess from");
    }

    #[test]
    fn this_namespace_has_a_loopback_interface() {
        assert!(existing_interfaces().contains(&"lo".to_string()));
    }
}
