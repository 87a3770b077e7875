//! The README's "Build the binaries once with `cargo build --release`" holds: a plain build
//! selects every workspace member, not only the root package (which a workspace with a root
//! package and no `default-members` does, leaving `trainer-agent` and `auditor` unbuilt).

use std::process::Command;

#[test]
fn a_plain_cargo_build_builds_every_member() {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline", "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids = |key: &str| {
        let mut v: Vec<String> =
            doc[key].as_array().unwrap_or_else(|| panic!("no {key}")).iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    let members = ids("workspace_members");
    assert_eq!(ids("workspace_default_members"), members);
    for binary_crate in ["tiebreak-trainer-agent", "tiebreak-auditor"] {
        assert!(members.iter().any(|m| m.contains(&format!("#{binary_crate}@"))), "{binary_crate} in {members:?}");
    }
}
