//! What the running kernel offers, for tests whose expectations differ between the paths shaper
//! takes on it (the download classifier's hook).

use shaper::classify::DownloadHook;

/// `(major, minor)` of the running kernel (`uname -r`: `6.1.0-57-amd64` → `(6, 1)`).
pub fn release() -> (u32, u32) {
    let text = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("read osrelease");
    let mut parts = text
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The hook the download program must be attached with here: tcx from Linux 6.6, a cls_bpf
/// filter before it — or anywhere when `SHAPER_DOWNLOAD_HOOK=cls_bpf` is set for the test run
/// (the daemons the tests start inherit it), so the host, which has tcx, tests that path too.
pub fn download_hook() -> DownloadHook {
    let forced =
        std::env::var_os(shaper::daemon::bpf::DOWNLOAD_HOOK_ENV).is_some_and(|v| v == "cls_bpf");
    if forced || release() < (6, 6) {
        DownloadHook::ClsBpf
    } else {
        DownloadHook::Tcx
    }
}
