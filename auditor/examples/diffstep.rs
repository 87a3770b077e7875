use engine::record::Record;
use engine::train::StepMode;
use kernels::Profile;
use std::path::Path;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dir = Path::new(&a[1]);
    let s: u64 = a[2].parse().unwrap();
    let prof: Profile = a[3].parse().unwrap();
    let rec = Record::open(dir).unwrap();
    let run = auditor::setup::build_run(rec.spec(), None, prof).unwrap();
    let prev = rec.checkpoint(s - 1).unwrap();
    let want = rec.checkpoint(s).unwrap();
    let log = rec.log(s).unwrap();
    let out = run.step(&prev, s, StepMode::Replay(&log), None).unwrap();
    for (name, t) in want.tensors() {
        let u = out.state.get(name).unwrap();
        for (i, (x, y)) in t.data.iter().zip(&u.data).enumerate() {
            if x.to_bits() != y.to_bits() {
                println!("{name}[{i}]: trainer {x:e} ({:08x}) auditor {y:e} ({:08x})", x.to_bits(), y.to_bits());
            }
        }
    }
}
