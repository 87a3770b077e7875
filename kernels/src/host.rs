//! What the benchmarks print about the machine they ran on.

/// The value of the first `name : value` line of `/proc/cpuinfo` (`model name`, `flags`, …),
/// trimmed; `None` where the file or the field is missing (outside Linux, for one).
pub fn cpuinfo_field(name: &str) -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    field_of(&cpuinfo, name)
}

/// The number of `processor` entries of `/proc/cpuinfo` (0 where it cannot be read).
pub fn cpuinfo_processors() -> usize {
    std::fs::read_to_string("/proc/cpuinfo").map_or(0, |c| c.lines().filter(|l| l.starts_with("processor")).count())
}

fn field_of(cpuinfo: &str, name: &str) -> Option<String> {
    cpuinfo.lines().filter_map(|l| l.split_once(':')).find(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_matched_by_whole_name() {
        let text = "processor\t: 0\nmodel name\t: Some CPU  \nmodel\t\t: 143\nflags\t\t: fpu avx2\n\nprocessor\t: 1\n";
        assert_eq!(field_of(text, "model name").as_deref(), Some("Some CPU"));
        assert_eq!(field_of(text, "model").as_deref(), Some("143"));
        assert_eq!(field_of(text, "flags").as_deref(), Some("fpu avx2"));
        assert_eq!(field_of(text, "cache size"), None);
    }
}
