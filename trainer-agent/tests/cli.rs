//! The `trainer-agent` binary end to end: training output, inspection, determinism, crash
//! safety with resume, and clear errors on bad input that leave existing records untouched.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use engine::record::Record;

const BIN: &str = env!("CARGO_BIN_EXE_trainer-agent");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn config() -> PathBuf {
    repo().join("configs/synthetic-mlp.toml")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tb-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn train(out: &Path, extra: &[&str]) -> Output {
    Command::new(BIN).args(["train", "--config"]).arg(config()).arg("--out").arg(out).args(extra).output().unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// Every file under `dir` with its bytes, to show that a refused command changed nothing.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn train_then_inspect_agree_and_runs_are_deterministic() {
    let base = tmp("det");
    let a = json(&train(&base.join("a"), &["--steps", "12", "--json"]));
    let b = json(&train(&base.join("b"), &["--steps", "12", "--json"]));
    assert_eq!(a["root"], b["root"], "same config and seed must give the same root");
    assert_eq!(a["n_steps"], 12);
    assert!(a["final_loss"].as_f64().unwrap() > 0.0);
    assert!(a["eval_accuracy"].as_f64().is_some());
    // A reader that has gone (`inspect … | head -1`) ends the output quietly, exit code kept.
    for args in [&["inspect"][..], &["inspect", "--json"]] {
        let mut child = Command::new(BIN)
            .args(args)
            .arg(base.join("a"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && !err.contains("panicked"), "{args:?}: {:?} {err}", o.status);
    }
    let insp = Command::new(BIN).arg("inspect").arg(base.join("a")).arg("--json").output().unwrap();
    let insp = json(&insp);
    assert_eq!(insp["root"], a["root"]);
    assert_eq!(insp["n_steps"], 12);
    assert_eq!(insp["leaves"].as_array().unwrap().len(), 13, "initial state first, then one leaf per step");
    assert_eq!(insp["log_bytes"].as_array().unwrap().len(), 12);
    assert_eq!(insp["complete"], true);
    // Every step's committed files are checked, not only the leaves: one flipped byte of a
    // batch or of a checkpoint deep in the record is named.
    let dir = base.join("a");
    let checkpoint = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .expect("the record has checkpoints");
    for file in [dir.join("steps/0000000009.batch"), checkpoint] {
        let good = std::fs::read(&file).unwrap();
        let mut bad = good.clone();
        let at = bad.len() / 2;
        bad[at] ^= 1;
        std::fs::write(&file, &bad).unwrap();
        let o = Command::new(BIN).arg("inspect").arg(&dir).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!o.status.success() && err.contains(&name), "{name}: {:?} {err}", o.status);
        std::fs::write(&file, &good).unwrap();
    }
    let o = Command::new(BIN).arg("inspect").arg(&dir).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Another profile gives the same FP32 states, hence... a different root only through logs.
    let c = json(&train(&base.join("c"), &["--steps", "12", "--json", "--device", "cpu-seq"]));
    assert_eq!(c["n_steps"], 12);
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn kill_9_leaves_a_verifiable_prefix_and_resume_reproduces_the_same_leaves() {
    let base = tmp("crash");
    let steps = "300";
    let reference = json(&train(&base.join("ref"), &["--steps", steps, "--json"]));
    let out = base.join("run");
    let mut child = Command::new(BIN)
        .args(["train", "--config"])
        .arg(config())
        .arg("--out")
        .arg(&out)
        .args(["--steps", steps, "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it mid-run, after some steps (and past a checkpoint) have been committed.
    let started = Instant::now();
    let leaves = out.join("leaves.bin");
    while std::fs::metadata(&leaves).map(|m| m.len()).unwrap_or(0) < 109 * 45 {
        assert!(started.elapsed() < Duration::from_secs(120), "training made no progress");
        assert!(child.try_wait().unwrap().is_none(), "training finished before it could be killed; raise --steps");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();

    // The record verifies up to its last committed step and says it is incomplete.
    let rec = Record::open(&out).unwrap();
    assert!(!rec.is_complete());
    let committed = rec.n_steps();
    assert!((44..300).contains(&committed), "{committed}");
    for s in 1..=committed {
        rec.log(s).unwrap();
        rec.batch(s).unwrap();
    }
    for c in rec.checkpoint_steps() {
        if c <= committed && Path::new(&engine::record::checkpoint_path(&out, c)).exists() {
            rec.checkpoint(c).unwrap();
        }
    }
    let partial_leaves: Vec<_> = rec.leaves().to_vec();

    // Without --resume the directory is refused, untouched.
    let before = snapshot(&out);
    let o = train(&out, &["--steps", steps]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(snapshot(&out), before);

    // A resume never mints a new key under a mistyped name (it would sign the run as someone
    // else's): refused, and the record stays resumable.
    let typo = base.join("trianer.key");
    let o = train(&out, &["--steps", steps, "--resume", "--key", typo.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no such file") && err.contains("trianer.key"), "{err}");
    assert!(!typo.exists(), "no key was minted");

    let resumed = json(&train(&out, &["--steps", steps, "--json", "--resume"]));
    assert_eq!(resumed["root"], reference["root"], "resumed run must produce the uninterrupted run's leaves");
    let rec = Record::open(&out).unwrap();
    assert_eq!(&rec.leaves()[..partial_leaves.len()], &partial_leaves[..]);
    // The uncommitted per-step losses: recomputed steps appended again, the last line of each
    // step counts, and they equal the uninterrupted run's.
    let losses = trainer_agent::read_losses(&out);
    assert_eq!(losses.len(), 300);
    assert_eq!(losses, trainer_agent::read_losses(&base.join("ref")));
    let _ = std::fs::remove_dir_all(&base);
}

/// `--resume` where nothing was committed: a directory that does not exist is refused saying
/// to train without it (the OS error once); the leftovers of a start killed before it wrote its
/// spec are taken over, with or without `--resume`; another run's record is refused naming the
/// fields that differ.
#[test]
fn resume_says_what_it_cannot_resume_and_takes_over_an_unstarted_directory() {
    let base = tmp("resume-msgs");
    let o = train(&base.join("nowhere"), &["--steps", "3", "--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("holds no record to resume") && err.contains("without --resume"),
        "{err}"
    );
    assert!(err.matches("os error").count() <= 1, "{err}");
    for resume in [true, false] {
        let dir = base.join(format!("unstarted-{resume}"));
        for sub in ["steps", "checkpoints"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("spec.tmp"), b"{\"form").unwrap();
        let o =
            train(&dir, if resume { &["--steps", "3", "--resume", "--json"][..] } else { &["--steps", "3", "--json"] });
        assert_eq!(json(&o)["n_steps"], 3, "resume {resume}");
    }
    let other = base.join("other");
    json(&train(&other, &["--steps", "3", "--json"]));
    std::fs::remove_file(other.join("manifest.json")).unwrap();
    let o = train(&other, &["--steps", "4", "--resume", "--device", "cpu-alt"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("they differ in") && err.contains("device_profile"), "{err}");
    // A spec.json that is no spec is called damaged, not another run's.
    let mut spec = std::fs::read(other.join("spec.json")).unwrap();
    spec.truncate(spec.len() / 2);
    std::fs::write(other.join("spec.json"), spec).unwrap();
    let o = train(&other, &["--steps", "3", "--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("spec.json") && err.contains("not a run spec"), "{err}");

    // Killed after its spec but before its first leaf: started again, with or without --resume,
    // to the same root.
    let root = json(&train(&base.join("ref"), &["--steps", "3", "--json"]))["root"].clone();
    for resume in [true, false] {
        let dir = base.join(format!("no-leaf-{resume}"));
        std::fs::create_dir_all(dir.join("steps")).unwrap();
        std::fs::create_dir_all(dir.join("checkpoints")).unwrap();
        std::fs::copy(base.join("ref/spec.json"), dir.join("spec.json")).unwrap();
        std::fs::write(dir.join("leaves.bin"), b"").unwrap();
        std::fs::write(dir.join("checkpoints/0000000000.state.tmp"), b"torn").unwrap();
        let args: &[&str] = if resume { &["--steps", "3", "--resume", "--json"] } else { &["--steps", "3", "--json"] };
        assert_eq!(json(&train(&dir, args))["root"], root, "resume {resume}");
    }

    // A committed prefix damaged since it was written (before the checkpoint a resume keeps,
    // step 20 here) is refused, naming the file, and left as it is: resuming would sign a root
    // over it.
    let damaged = base.join("damaged");
    json(&train(&damaged, &["--steps", "23", "--json"]));
    std::fs::remove_file(damaged.join("manifest.json")).unwrap();
    let batch = damaged.join("steps/0000000002.batch");
    let mut bytes = std::fs::read(&batch).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&batch, bytes).unwrap();
    let before = snapshot(&damaged);
    let o = train(&damaged, &["--steps", "23", "--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("batch hash of step 2") && err.contains("cannot resume"), "{err}");
    assert!(snapshot(&damaged) == before, "a refused resume changes nothing");

    // One writer at a time: a record another trainer holds is refused, untouched.
    let held = base.join("held");
    json(&train(&held, &["--steps", "3", "--json"]));
    std::fs::remove_file(held.join("manifest.json")).unwrap();
    let lock = std::fs::File::open(&held).unwrap();
    lock.try_lock().unwrap();
    let before = snapshot(&held);
    let o = train(&held, &["--steps", "3", "--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("being written by another trainer"), "{err}");
    assert!(snapshot(&held) == before);
    drop(lock);
    json(&train(&held, &["--steps", "3", "--resume", "--json"]));
}

#[test]
fn inspect_plots_loss_tie_breaks_and_log_bytes_per_step() {
    let base = tmp("plot");
    let rec = base.join("run");
    json(&train(&rec, &["--steps", "12", "--json"]));
    let svg = base.join("run.svg");
    let o = Command::new(BIN).arg("inspect").arg(&rec).arg("--plot").arg(&svg).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let doc = std::fs::read_to_string(&svg).unwrap();
    assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
    for title in ["loss (reported by the trainer", "tie-breaks per step", "log bytes per step"] {
        assert!(doc.contains(title), "{title} missing");
    }
    // One point per step in each of the three lines.
    let lines: Vec<&str> = doc.split("points=\"").skip(1).map(|p| p.split('"').next().unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l.split(' ').count() == 12), "{lines:?}");
    // Without the trainer's losses.txt the loss panel says so; the others are drawn.
    std::fs::remove_file(rec.join(trainer_agent::LOSSES_FILE)).unwrap();
    let o = Command::new(BIN).arg("inspect").arg(&rec).arg("--plot").arg(&svg).output().unwrap();
    assert!(o.status.success());
    let doc = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(doc.matches("<polyline").count(), 2);
    assert!(doc.contains("no data"));
    // A plot into a folder that does not exist fails, naming the flag, and writes nothing.
    let o = Command::new(BIN).arg("inspect").arg(&rec).arg("--plot").arg(base.join("no/such.svg")).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--plot"), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn bad_input_gets_a_clear_error_and_touches_nothing() {
    let base = tmp("bad");
    let good = base.join("good");
    json(&train(&good, &["--steps", "5", "--json"]));
    let before = snapshot(&good);

    let check = |o: Output, needle: &str| {
        assert!(!o.status.success(), "expected failure mentioning {needle:?}");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(err.contains(needle), "error should mention {needle:?}: {err}");
    };
    // Config typo.
    let typo = base.join("typo.toml");
    std::fs::write(&typo, std::fs::read_to_string(config()).unwrap().replace("momentum", "momentun")).unwrap();
    check(
        Command::new(BIN).args(["train", "--config"]).arg(&typo).arg("--out").arg(&good).output().unwrap(),
        "momentun",
    );
    // Unknown profile.
    check(train(&good, &["--device", "tpu"]), "cpu-seq");
    // Fault beyond the run.
    check(train(&base.join("f"), &["--steps", "5", "--fault", "flip-label@9"]), "beyond");
    check(train(&base.join("f"), &["--steps", "5", "--fault", "melt@2"]), "unknown fault kind");
    // A different run in the output directory.
    check(train(&good, &["--steps", "6"]), "does not hold this run");
    // Step 0 has no log; an export into a folder that does not exist names the path given.
    check(Command::new(BIN).arg("inspect").arg(&good).args(["--step", "0"]).output().unwrap(), "step 0 is the initial");
    let o = Command::new(BIN).arg("export").arg(&good).arg("--out").arg(base.join("no/such.st")).output().unwrap();
    assert!(!String::from_utf8_lossy(&o.stderr).contains("partial"), "{}", String::from_utf8_lossy(&o.stderr));
    check(o, "no/such.st");
    // A data file the config does not use is an error, not silently ignored.
    check(train(&base.join("d"), &["--steps", "5", "--data", "Cargo.toml"]), "synthetic");
    assert!(!base.join("d").exists());
    // Starting weights that are not a safetensors file of this model.
    check(train(&base.join("w"), &["--steps", "5", "--init-weights", "nowhere.safetensors"]), "nowhere.safetensors");
    std::fs::write(base.join("junk.safetensors"), b"junk").unwrap();
    let junk = base.join("junk.safetensors");
    check(
        train(&base.join("w"), &["--steps", "5", "--init-weights", junk.to_str().unwrap()]),
        "not a safetensors file",
    );
    assert!(!base.join("w").exists(), "nothing written for refused starting weights");
    // Missing and corrupt data.
    let mnist = repo().join("configs/mnist-mlp.toml");
    let run = |data: &Path| {
        Command::new(BIN)
            .args(["train", "--config"])
            .arg(&mnist)
            .arg("--out")
            .arg(base.join("m"))
            .arg("--data")
            .arg(data)
            .output()
            .unwrap()
    };
    check(run(&base.join("nowhere")), "nowhere");
    let corrupt = base.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::write(corrupt.join("t10k-images-idx3-ubyte.gz"), [0x1f, 0x8b, 8, 0, 1, 2, 3]).unwrap();
    std::fs::write(corrupt.join("t10k-labels-idx1-ubyte"), [0, 0, 8, 1, 0, 0, 0, 0]).unwrap();
    check(run(&corrupt), "t10k-images-idx3-ubyte.gz");
    assert!(!base.join("m").exists(), "nothing written for a failed data load");

    // A run that overflows FP32 stops at that step, naming the site once (the message used to be
    // repeated by the error chain).
    let hot = base.join("hot.toml");
    std::fs::write(&hot, std::fs::read_to_string(config()).unwrap().replace("lr = 0.05", "lr = 1e6")).unwrap();
    let o = Command::new(BIN)
        .args(["train", "--steps", "5", "--config"])
        .arg(&hot)
        .arg("--out")
        .arg(base.join("h"))
        .output();
    let err = String::from_utf8_lossy(&o.unwrap().stderr).to_string();
    assert!(err.contains("is not finite in FP32") && err.matches("rounding site").count() == 1, "{err}");

    assert_eq!(snapshot(&good), before, "refused commands must leave the existing record untouched");
    let _ = std::fs::remove_dir_all(&base);
}

/// `--device cuda` parses in every build; without CUDA support or a driver it is a clear error
/// (no panic) before anything is written.
#[test]
fn device_cuda_without_support_or_driver_fails_cleanly() {
    if let Ok(d) = kernels::Device::new(kernels::Profile::Cuda) {
        println!("skipped: a GPU is present ({})", d.gpu_description().unwrap_or_default());
        return;
    }
    let base = tmp("cuda");
    let out = base.join("run");
    let o = train(&out, &["--steps", "2", "--device", "cuda"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("device profile cuda is unavailable: "), "{err}");
    let why = if cfg!(feature = "cuda") { "CUDA driver" } else { "rebuild with `--features cuda`" };
    assert!(err.contains(why), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "nothing is written for a device that cannot run");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn export_writes_safetensors_with_candle_names() {
    let base = tmp("export");
    json(&train(&base.join("r"), &["--steps", "3", "--json"]));
    let file = base.join("model.safetensors");
    let o = Command::new(BIN).arg("export").arg(base.join("r")).arg("--out").arg(&file).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["fc1.weight"]["shape"], serde_json::json!([64, 32]));
    assert_eq!(header["fc2.bias"]["dtype"], "F32");

    // An earlier export is replaced.
    let o = Command::new(BIN).arg("export").arg(base.join("r")).arg("--out").arg(&file).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Paths export must not replace: a file of the record it reads, a directory, a FIFO, a file
    // of another kind (a signing key). Each is refused naming it, nothing is written, and no
    // partial file is left.
    let fifo = base.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    std::fs::create_dir(base.join("dir")).unwrap();
    let key = base.join("other.key");
    std::fs::write(&key, format!("{}\n", "ab".repeat(32))).unwrap();
    let before = snapshot(&base.join("r"));
    for (out, why) in [
        (key.clone(), "left as it is"),
        (base.join("r/manifest.json"), "inside the record"),
        (base.join("r/fresh.safetensors"), "inside the record"),
        (base.join("dir"), "a directory"),
        (fifo.clone(), "not a regular file"),
    ] {
        let o = Command::new(BIN).arg("export").arg(base.join("r")).arg("--out").arg(&out).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(why) && err.contains(out.to_str().unwrap()), "{err}");
    }
    assert!(snapshot(&base.join("r")) == before, "the record is unchanged");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), format!("{}\n", "ab".repeat(32)), "the key is unchanged");
    let names: Vec<_> = std::fs::read_dir(&base).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!names.iter().any(|n| n.to_string_lossy().contains("partial")), "no partial file: {names:?}");
    let _ = std::fs::remove_dir_all(&base);
}

/// The export's metadata names the state hash of the record's format: BLAKE3 for this build's
/// records, SHA-256 for a record of the format-3 build (`auditor/tests/fixtures/format3`), each
/// equal to the committed leaf.
#[test]
fn export_names_the_state_hash_of_the_records_format() {
    let base = tmp("export-formats");
    json(&train(&base.join("r"), &["--steps", "3", "--json"]));
    copy_dir(&repo().join("auditor/tests/fixtures/format3/honest"), &base.join("f3"));
    for (rec, key) in [("r", "tiebreak.state_blake3"), ("f3", "tiebreak.state_sha256")] {
        let file = base.join(format!("{rec}.safetensors"));
        let o = Command::new(BIN).arg("export").arg(base.join(rec)).arg("--out").arg(&file).output().unwrap();
        assert!(o.status.success(), "{rec}: {}", String::from_utf8_lossy(&o.stderr));
        let bytes = std::fs::read(&file).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let r = Record::open(&base.join(rec)).unwrap();
        let leaf = common::codec::to_hex(&r.leaf(r.n_steps()).unwrap().state);
        assert_eq!(header["__metadata__"][key].as_str(), Some(leaf.as_str()), "{rec}: {}", header["__metadata__"]);
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// An interrupted record started by the format-3 build is not resumed by this one (its leaves
/// hash states with SHA-256): the refusal names the build and format that started it, and
/// changes no file.
#[test]
fn resuming_a_record_of_the_format_3_build_is_refused_by_name() {
    let base = tmp("resume-format3");
    let out = base.join("f3");
    copy_dir(&repo().join("auditor/tests/fixtures/format3/honest"), &out);
    std::fs::remove_file(out.join("manifest.json")).unwrap();
    let before = snapshot(&out);
    let o = Command::new(BIN)
        .args(["train", "--resume", "--config"])
        .arg(repo().join("auditor/tests/fixtures/format3/config.toml"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("was started by tiebreak 0.3.0 (record format 3)"), "{stderr}");
    assert_eq!(snapshot(&out), before);
    let _ = std::fs::remove_dir_all(&base);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A raw HTTP GET; the status line and body.
fn http_get(addr: &str, path: &str, token: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Issue 14: `serve --token ''` started and then refused every request; tokens could only be
/// given on the command line (where process lists show them); SIGHUP killed the server. Now
/// SIGHUP reloads a token file (rotation without a restart) and never stops the server.
#[cfg(unix)]
#[test]
fn serve_takes_its_token_from_a_file_or_the_environment_refuses_an_empty_one_and_outlives_sighup() {
    use std::io::BufRead;
    let dir = tmp("serve-token");
    let records = dir.join("records");
    std::fs::create_dir_all(&records).unwrap();
    let base = || {
        let mut c = Command::new(BIN);
        c.args(["serve", "--listen", "127.0.0.1:0", "--records"]).arg(&records).env_remove("TRAINER_TOKEN");
        c
    };
    let empty = dir.join("empty-token");
    std::fs::write(&empty, "").unwrap();
    let empty = empty.to_str().unwrap();
    for (args, env) in [(vec!["--token", ""], None), (vec![], Some("  ")), (vec!["--token-file", empty], None)] {
        let mut c = base();
        c.args(&args);
        if let Some(v) = env {
            c.env("TRAINER_TOKEN", v);
        }
        let o = c.output().unwrap();
        assert!(!o.status.success(), "{args:?} {env:?}: started");
        assert!(String::from_utf8_lossy(&o.stderr).contains("empty"), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // A --data that cannot be a dataset is refused at start, naming it: a kind that is not one, a
    // path that does not exist, a second bare path (which of the two would be silently lost).
    let file = dir.join("table.csv");
    std::fs::write(&file, "1,0\n").unwrap();
    let f = file.to_str().unwrap();
    for (data, names) in [
        (vec![format!("csvv={f}")], "\"csvv\" is not a kind of data"),
        (vec!["csv=no-such.csv".to_string()], "no-such.csv does not exist"),
        (vec![f.to_string(), f.to_string()], "a second bare PATH"),
    ] {
        let mut c = base();
        c.env("TRAINER_TOKEN", "t");
        for d in &data {
            c.args(["--data", d]);
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(names), "{data:?}: {err}");
    }

    let file = dir.join("token");
    std::fs::write(&file, "from-a-file\n").unwrap();
    for (use_file, token) in [(true, "from-a-file"), (false, "from-the-env")] {
        let mut c = base();
        if use_file {
            // No grace for the replaced token, so that the rotation below shows at once.
            c.arg("--token-file").arg(&file).args(["--token-grace-s", "0"]);
        } else {
            c.env("TRAINER_TOKEN", token);
        }
        let mut child = c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("listening on http://").unwrap_or_else(|| panic!("{line}")).to_string();
        assert!(http_get(&addr, "/v1/runs", token).starts_with("HTTP/1.1 200"), "{token}");
        assert!(http_get(&addr, "/v1/runs", "wrong").starts_with("HTTP/1.1 401"));
        let pid = child.id().to_string();
        assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
        std::thread::sleep(Duration::from_millis(300));
        assert!(child.try_wait().unwrap().is_none(), "SIGHUP stopped the server");
        assert!(http_get(&addr, "/v1/runs", token).starts_with("HTTP/1.1 200"), "still serving after SIGHUP");
        if use_file {
            // Token rotation: SIGHUP reads the file again; a blank file then keeps the token.
            std::fs::write(&file, "rotated\n").unwrap();
            assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
            let t0 = Instant::now();
            while !http_get(&addr, "/v1/runs", "rotated").starts_with("HTTP/1.1 200") {
                assert!(t0.elapsed() < Duration::from_secs(5), "SIGHUP did not reload the token");
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(http_get(&addr, "/v1/runs", token).starts_with("HTTP/1.1 401"), "--token-grace-s 0: revoked");
            std::fs::write(&file, " \n").unwrap();
            assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
            std::thread::sleep(Duration::from_millis(300));
            assert!(http_get(&addr, "/v1/runs", "rotated").starts_with("HTTP/1.1 200"), "a blank file kept the token");
            std::fs::write(&file, "from-a-file\n").unwrap();
        }
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "SIGTERM did not stop it");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{status:?}");
    }
}

/// Runs the trainer agent in `dir` with a 10 s limit: a command waiting on a FIFO fails the
/// test instead of hanging the suite.
fn within_10s(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir).args(args).stdin(std::process::Stdio::null());
    common::files::within_10s(move || cmd.output().unwrap())
}

/// A FIFO or a device named as the config, the data, the starting weights or the token file, or
/// standing in a record for its spec, is refused at once, naming it, never waited on or read
/// without end.
#[test]
fn special_files_are_refused_not_waited_on() {
    let dir = tmp("special-files");
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let f = fifo.to_str().unwrap();
    let rec = dir.join("rec");
    assert!(train(&rec, &[]).status.success());
    let before = snapshot(&rec);
    let (cfg, csv) = (config(), repo().join("configs/csv-example.toml"));
    let (cfg, csv) = (cfg.to_str().unwrap(), csv.to_str().unwrap());
    let r = rec.to_str().unwrap();
    for (args, needle) in [
        (vec!["train", "--config", f, "--out", "o1"], "a FIFO"),
        (vec!["train", "--config", "/dev/zero", "--out", "o1"], "a character device"),
        (vec!["train", "--config", csv, "--data", f, "--out", "o2"], "a FIFO"),
        (vec!["train", "--config", cfg, "--init-weights", f, "--out", "o3"], "a FIFO"),
        (vec!["train", "--config", cfg, "--init-weights", "/dev/zero", "--out", "o3"], "a character device"),
        (vec!["serve", "--records", r, "--listen", "127.0.0.1:0", "--token-file", f], "a FIFO"),
    ] {
        let out = within_10s(&dir, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(needle) && (err.contains(f) || err.contains("/dev/zero")), "{args:?}: {err}");
    }
    // A record whose spec is a FIFO: inspect, export and resume name it.
    let odd = dir.join("odd");
    std::fs::create_dir(&odd).unwrap();
    for e in std::fs::read_dir(&rec).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), odd.join(e.file_name())).unwrap();
    }
    std::fs::remove_file(odd.join("spec.json")).unwrap();
    std::os::unix::fs::symlink(&fifo, odd.join("spec.json")).unwrap();
    let o = odd.to_str().unwrap();
    for args in [
        vec!["inspect", o],
        vec!["export", o, "--out", "w.safetensors"],
        vec!["train", "--config", cfg, "--out", o, "--resume"],
    ] {
        let out = within_10s(&dir, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("spec.json") && err.contains("a FIFO"), "{args:?}: {err}");
    }
    assert!(snapshot(&rec) == before, "the record behind the links is unchanged");
}

/// A run this machine has not the memory for is refused before anything is written, saying how
/// much it needs: not an allocation abort mid-run.
#[test]
fn a_run_past_the_machines_memory_is_refused_up_front() {
    let base = tmp("memory");
    let out = base.join("r");
    // `train --config CONFIG` into `out` on a machine with `available` bytes.
    let train_with = |config: &Path, available: u64| {
        Command::new(BIN)
            .env(engine::memory::AVAILABLE_ENV, available.to_string())
            .args(["train", "--config"])
            .arg(config)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = train_with(&config(), 4096);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("needs at least") && err.contains("available"), "{err}");
    assert!(!out.exists(), "nothing was written");
    assert!(!base.join("trainer.key").exists(), "no key was made");

    // The data a spec makes counts: 262,144 synthetic examples of 1024 features are 1 GiB
    // before any model, refused before they are generated.
    let big = base.join("big-data.toml");
    std::fs::write(
        &big,
        "[model]\nkind = \"mlp\"\nhidden = []\n[data]\nkind = \"synthetic\"\nexamples = 262144\nholdout = 16\n\
         features = 1024\nclasses = 2\n[train]\nbatch_size = 4\nsteps = 1\nseed = 1\ncheckpoint_interval = 1\n\
         [optimizer]\nkind = \"sgd\"\nlr = 0.1\n",
    )
    .unwrap();
    let started = Instant::now();
    let o = train_with(&big, 512 << 20);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("needs at least 1.") && err.contains("dataset"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10) && !out.exists(), "refused before the data was made");
    let _ = std::fs::remove_dir_all(&base);
}

/// A signing key inside the record directory is refused before anything is made.
#[test]
fn a_key_inside_the_record_is_refused() {
    let base = tmp("keys");
    let out = base.join("r");
    let inside = out.join("trainer.key");
    let o = train(&out, &["--key", inside.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("inside the record directory"), "{err}");
    assert!(!inside.exists() && !out.exists(), "nothing was made");
    let _ = std::fs::remove_dir_all(&base);
}
