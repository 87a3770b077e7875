//! The README's main command stays true: the demo trains, serves, audits over HTTP through the
//! daemon, and finds the injected fault at its step (and nothing in the honest run).

use std::process::Command;

#[test]
fn the_main_job_finds_the_injected_fault_over_http() {
    let out = std::env::temp_dir().join(format!("tiebreak-demo-test-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_tiebreak-demo"))
        .args(["--out", out.to_str().unwrap(), "--fault", "perturb-weight@23"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    let line = |needle: &str| {
        stdout.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?} in\n{stdout}"))
    };
    assert!(line("of honest").contains("verdict consistent"), "{stdout}");
    assert!(line("of honest").contains("cpu-alt"), "replayed on the fast other profile: {stdout}");
    assert!(line("of faulty").contains("verdict diverged"), "{stdout}");
    assert_eq!(line("first diverging step").trim(), "first diverging step 23");
    for f in ["honest.report.json", "faulty.report.json", "faulty.evidence"] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    let report = std::fs::read_to_string(out.join("faulty.report.json")).unwrap();
    auditor::report::verify(&report).unwrap();
    let _ = std::fs::remove_dir_all(&out);
}
