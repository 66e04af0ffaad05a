//! Lock-out and misuse guards (root only): a block covering the operator's own SSH address is
//! refused without `--force`, and nobody but root can read or change the pinned maps or the
//! state database.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

use integration_tests::Instance;

#[test]
fn blocking_the_operators_ssh_address_is_refused_without_force() {
    let inst = Instance::new("lockout");
    let out = inst
        .cmd()
        .env("SSH_CONNECTION", "198.18.1.2 40000 198.18.1.1 22")
        .args(["block", "198.18.1.0/24"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("198.18.1.0/24") && err.contains("198.18.1.2") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        inst.ok(&["list", "--json"]).trim(),
        "[]",
        "nothing was stored"
    );
    // The same through import.
    let list = inst.state_dir.join("list.txt");
    std::fs::write(&list, "198.18.5.5\n198.18.0.0/16\n").unwrap();
    let out = inst
        .cmd()
        .env("SSH_CLIENT", "198.18.1.2 40000 22")
        .args(["import", list.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "import covering the operator refused"
    );
    assert_eq!(inst.ok(&["list", "--json"]).trim(), "[]");
    // Forced, it goes through; other prefixes never needed forcing.
    let out = inst
        .cmd()
        .env("SSH_CONNECTION", "198.18.1.2 40000 198.18.1.1 22")
        .args(["block", "198.18.1.0/24", "--force"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = inst
        .cmd()
        .env("SSH_CONNECTION", "198.18.1.2 40000 198.18.1.1 22")
        .args(["block", "198.18.9.0/24"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn only_root_can_read_or_change_the_pins_and_the_state() {
    let inst = Instance::new("modes");
    let veth = format!("afm{}", std::process::id() % 100_000);
    let peer = format!("{veth}p");
    let st = std::process::Command::new("ip")
        .args(["link", "add", &veth, "type", "veth", "peer", "name", &peer])
        .status()
        .unwrap();
    assert!(st.success());
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.0])
                .status();
        }
    }
    let _del = Del(veth.clone());
    inst.ok(&["attach", &veth, "--mode", "skb"]);
    inst.ok(&["block", "198.18.3.3"]);

    let db = inst.state_dir.join("state.db");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&inst.state_dir), 0o700, "state dir");
    assert_eq!(mode(&db), 0o600, "state.db");
    assert_eq!(std::fs::metadata(&db).unwrap().uid(), 0);
    for entry in walk(&inst.pin_dir) {
        let m = mode(&entry);
        assert_eq!(
            m & 0o077,
            0,
            "{} is mode {m:o}: readable by others",
            entry.display()
        );
    }

    // As nobody: every command is refused, reading the database or a map fails at the OS too.
    let as_nobody = |args: &[&str]| {
        let base = inst.cmd();
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(base.get_program())
            .envs(base.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .args(args)
            .output()
            .unwrap()
    };
    for args in [
        &["list"][..],
        &["block", "198.18.4.4"],
        &["unblock", "198.18.3.3"],
        &["stats"],
    ] {
        let out = as_nobody(args);
        assert!(!out.status.success(), "nobody ran {args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs root"));
    }
    let cat = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(!cat.status.success(), "nobody read state.db");
    let bpftool = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "bpftool",
            "map",
            "dump",
            "pinned",
        ])
        .arg(inst.pin_dir.join("maps/BLOCK_V4"))
        .output()
        .unwrap();
    assert!(!bpftool.status.success(), "nobody dumped a pinned map");
    // And nothing changed.
    assert!(inst.ok(&["list"]).contains("198.18.3.3"));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_owned()];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
