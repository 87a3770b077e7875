//! Public keys given on the command line (`audit --trainer-pubkey`, `verify-report
//! --auditor-key`): 64 hex digits, or `@FILE` naming a file that holds them. Parsed once here,
//! into the lower-case hex the records and reports use; anything else is a usage error naming
//! the flag.

use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;

use super::exit::{Exit, Failure, undecided, usage};
use super::output::{emit, require_exists};

/// A key file holds 64 hex digits and perhaps a newline; anything much longer is not one.
const KEY_FILE_BYTES_MAX: u64 = 1024;

/// `value` as given with `flag`: the hex itself, or `@FILE`.
pub fn public_key_arg(flag: &str, value: &str) -> Result<String, Failure> {
    match value.strip_prefix('@') {
        Some(file) => public_key_file(flag, Path::new(file)),
        None => public_key_hex(flag, value),
    }
}

/// The key held in `path` (given with `flag`).
pub fn public_key_file(flag: &str, path: &Path) -> Result<String, Failure> {
    require_exists(flag, path)?;
    let text = common::files::read_regular_text(path, KEY_FILE_BYTES_MAX).map_err(|e| match e {
        common::files::ReadError::Unfit(what) => {
            usage(format_args!("{flag} {}: {what}: not a key file (64 hex digits expected)", path.display()))
        }
        e => undecided(format_args!("{flag} {}: {e}", path.display())),
    })?;
    public_key_hex(&format!("{flag} {}", path.display()), text.trim())
}

/// Checks `hex` is an ed25519 public key: 64 hex digits (either case) that decode to a point on
/// the curve. Returns it in lower case.
pub fn public_key_hex(what: &str, hex: &str) -> Result<String, Failure> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(usage(format_args!(
            "{what}: {:?} is not an ed25519 public key (64 hex digits expected, got {} characters)",
            shorten(hex),
            hex.chars().count()
        )));
    }
    let lower = hex.to_ascii_lowercase();
    let bytes = common::codec::from_hex::<32>(&lower).expect("64 hex digits are 32 bytes");
    VerifyingKey::from_bytes(&bytes)
        .map_err(|_| usage(format_args!("{what}: {lower} is not an ed25519 public key (not a curve point)")))?;
    Ok(lower)
}

/// A bad value is echoed, but not a whole file's worth of it.
fn shorten(s: &str) -> String {
    const SHOWN_CHARS_MAX: usize = 80;
    if s.chars().count() <= SHOWN_CHARS_MAX {
        s.to_string()
    } else {
        s.chars().take(SHOWN_CHARS_MAX).collect::<String>() + "…"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid public key: the one of a fixed secret key.
    fn a_key() -> String {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        common::codec::to_hex(sk.verifying_key().as_bytes())
    }

    #[test]
    fn accepts_a_key_in_either_case_and_returns_lower_case() {
        let k = a_key();
        assert_eq!(public_key_hex("--k", &k).unwrap(), k);
        assert_eq!(public_key_hex("--k", &k.to_ascii_uppercase()).unwrap(), k);
    }

    #[test]
    fn refuses_wrong_lengths_non_hex_and_non_points_naming_the_flag() {
        let k = a_key();
        for bad in [&k[..63], &format!("{k}0"), &format!("{}g", &k[..63]), "", " "] {
            match public_key_hex("--trainer-pubkey", bad) {
                Err(Failure::Usage(e)) => assert!(e.to_string().contains("--trainer-pubkey"), "{e}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        // Not every 32 bytes are a compressed Edwards point; find one that is not.
        let not_a_point = (0u8..=255)
            .map(|b| {
                let mut bytes = [b; 32];
                bytes[31] &= 0x7f;
                common::codec::to_hex(&bytes)
            })
            .find(|h| VerifyingKey::from_bytes(&common::codec::from_hex::<32>(h).unwrap()).is_err())
            .expect("some byte pattern is not a point");
        assert!(matches!(public_key_hex("--k", &not_a_point), Err(Failure::Usage(_))));
    }
}

#[derive(clap::Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the new secret key (64 hex digits, mode 0600); an existing file is never
    /// overwritten.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// `auditor keygen`: a new signing key (the firm's one key of a fleet, named by every daemon's
/// `key_file`); prints its public key.
pub fn keygen(args: KeygenArgs) -> Result<Exit, Failure> {
    if std::fs::symlink_metadata(&args.out).is_ok() {
        return Err(usage(format_args!("--out {}: already exists; a key is never overwritten", args.out.display())));
    }
    engine::output::check_key_path(&args.out)
        .map_err(|why| usage(format_args!("--out {}: {why}", args.out.display())))?;
    let key = engine::record::load_or_create_key(&args.out)
        .map_err(|e| undecided(format_args!("--out {}: {e}", args.out.display())))?;
    emit(&format!("{}\n", common::codec::to_hex(key.verifying_key().as_bytes())))?;
    Ok(Exit::Ok)
}
