//! The signed manifest a finished record carries, and the trainer's signing key.

use std::fs;
use std::path::Path;

use common::codec::{self, to_hex};
use ed25519_dalek::{Signature, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::files::read_regular;
use super::{RecordError, io, write_atomic};
use crate::spec::RunSpec;

/// The signed manifest, written when a run finishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub software_version: String,
    /// Hex SHA-256 of `spec.json`.
    pub spec_hash: String,
    pub device_profile: String,
    pub checkpoint_interval: u64,
    /// Steps committed (leaves = n_steps + 1, the initial state first).
    pub n_steps: u64,
    /// Hex RFC 6962 root over the leaves.
    pub root: String,
    /// Hex ed25519 public key of the trainer.
    pub public_key: String,
    /// Hex ed25519 signature over [`Manifest::signing_payload`].
    pub signature: String,
}

impl Manifest {
    /// The bytes the trainer signs: a fixed binary encoding of every field but the signature.
    pub fn signing_payload(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"TBMF");
        out.extend_from_slice(&self.format_version.to_le_bytes());
        for s in [&self.software_version, &self.spec_hash, &self.device_profile, &self.root, &self.public_key] {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&self.checkpoint_interval.to_le_bytes());
        out.extend_from_slice(&self.n_steps.to_le_bytes());
        out
    }

    /// Checks the fields the manifest repeats from the spec: format version, device profile,
    /// software version and checkpoint interval must be the spec's, and no more steps than the
    /// spec plans may be committed. The error names the field and both values.
    pub fn check_against(&self, spec: &RunSpec) -> Result<(), String> {
        let differ = |field: &str, manifest: &dyn std::fmt::Display, spec: &dyn std::fmt::Display| {
            Err(format!("{field} is {manifest} in the manifest but {spec} in the spec"))
        };
        if self.format_version != spec.format_version {
            return differ("format_version", &self.format_version, &spec.format_version);
        }
        if self.device_profile != spec.device_profile {
            return differ("device_profile", &self.device_profile, &spec.device_profile);
        }
        if self.software_version != spec.software_version {
            return differ("software_version", &self.software_version, &spec.software_version);
        }
        let interval = spec.config.train.checkpoint_interval;
        if self.checkpoint_interval != interval {
            return differ("checkpoint_interval", &self.checkpoint_interval, &interval);
        }
        if self.n_steps > spec.n_steps {
            return Err(format!(
                "n_steps is {} in the manifest, more than the spec's {} planned steps",
                self.n_steps, spec.n_steps
            ));
        }
        Ok(())
    }

    /// Checks the signature against the embedded public key.
    pub fn verify_signature(&self) -> Result<(), String> {
        let pk: [u8; 32] = codec::from_hex::<32>(&self.public_key).ok_or("public_key is not 32 hex bytes")?;
        let sig: [u8; 64] = codec::from_hex::<64>(&self.signature).ok_or("signature is not 64 hex bytes")?;
        let key = VerifyingKey::from_bytes(&pk).map_err(|e| format!("public key invalid: {e}"))?;
        key.verify(&self.signing_payload(), &Signature::from_bytes(&sig))
            .map_err(|_| "signature does not verify against the manifest's public key".to_string())
    }
}

/// Loads the ed25519 key at `path`, or generates and stores one (mode 0600) if it is absent.
pub fn load_or_create_key(path: &Path) -> Result<SigningKey, RecordError> {
    if fs::symlink_metadata(path).is_ok() {
        let bytes = read_regular(path, 1024)?;
        let text = String::from_utf8_lossy(&bytes);
        let seed = codec::from_hex::<32>(text.trim()).ok_or_else(|| RecordError::Corrupt {
            path: path.to_path_buf(),
            offset: None,
            what: "expected 64 hex characters (an ed25519 secret key)".into(),
        })?;
        return Ok(SigningKey::from_bytes(&seed));
    }
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed)
        .map_err(|e| RecordError::Refused(format!("no OS randomness to generate a signing key: {e}")))?;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    }
    write_atomic(path, format!("{}\n", to_hex(&seed)).as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o600));
    }
    Ok(SigningKey::from_bytes(&seed))
}
