//! `shaper check` as root refuses a policy, or a module it requires, that another user could
//! swap: through a folder they own or may write, or a symlink into one (sshd's StrictModes).

use std::os::unix::fs::PermissionsExt;

use crate::support::{output, shaper};

const POLICY: &str = "function classify(conn) return nil end\n";

fn refusal(script: &std::path::Path) -> String {
    let out = output(shaper().arg("check").arg(script));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    err
}

#[test]
fn a_script_in_a_folder_another_user_controls_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    let script = theirs.join("policy.lua");
    std::fs::write(&script, POLICY).unwrap();

    std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
    let err = refusal(&script);
    let t = theirs.display();
    assert!(
        err.contains(&format!("refusing {}", script.display()))
            && err.contains(&format!("the folder {t} is owned by uid 65534"))
            && err.contains(&format!("`chown root:root {t}`")),
        "{err}"
    );

    std::os::unix::fs::chown(&theirs, Some(0), None).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = refusal(&script);
    assert!(
        err.contains(&format!(
            "the folder {t} is writable by its group and everyone"
        )) && err.contains(&format!("`chmod go-w {t}`")),
        "{err}"
    );
    let out = output(
        shaper()
            .args(["check", "--allow-insecure-script"])
            .arg(&script),
    );
    assert!(out.status.success(), "the opt-out still works");

    // Root's own folder, 0755: accepted.
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = output(shaper().arg("check").arg(&script));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_symlinked_script_and_a_module_in_an_open_folder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o757)).unwrap();
    let planted = open.join("planted.lua");
    std::fs::write(&planted, POLICY).unwrap();
    let link = dir.path().join("policy.lua");
    std::os::unix::fs::symlink(&planted, &link).unwrap();
    let err = refusal(&link);
    assert!(
        err.contains(&format!(
            "refusing {} (which is {})",
            link.display(),
            planted.display()
        )) && err.contains("is writable by everyone (mode 0757)"),
        "{err}"
    );

    // `require("open.rules")` reaches into the same folder.
    std::fs::write(open.join("rules.lua"), "return {}\n").unwrap();
    let script = dir.path().join("main.lua");
    std::fs::write(
        &script,
        format!("local r = require(\"open.rules\")\n{POLICY}"),
    )
    .unwrap();
    let err = refusal(&script);
    assert!(
        err.contains("main.lua:1:") && err.contains(&format!("the folder {}", open.display())),
        "{err}"
    );
}
