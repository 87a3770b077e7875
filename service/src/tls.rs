//! TLS for both servers and for the auditor's client, through rustls with the ring provider.
//!
//! - [`ServerTls::from_pem_files`]: a certificate chain and its private key (PEM) for
//!   `--tls-cert`/`--tls-key`; [`crate::serve_tls`] then terminates TLS on every accepted
//!   connection, the handshake inside the header-read timeout.
//! - [`install_provider`]: makes ring the process's rustls provider (reqwest is built without
//!   one); every client and server here calls it first.
//! - [`warn_if_plain_and_exposed`]: plain HTTP on an address other than loopback is logged as a
//!   warning at start.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Installs ring as the process-wide rustls provider (idempotent).
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A server's TLS configuration.
#[derive(Clone)]
pub struct ServerTls(pub(crate) tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// Reads the certificate chain (`cert`, PEM, leaf first) and its private key (`key`, PEM:
    /// PKCS#8, SEC1 or PKCS#1). Errors name the file and what is wrong with it.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<ServerTls, String> {
        install_provider();
        let certs = read_certs(cert).map_err(|e| format!("--tls-cert {e}"))?;
        let key = read_pem(key)
            .and_then(|pem| PrivateKeyDer::from_pem_slice(&pem).map_err(|e| e.to_string()))
            .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
        Ok(ServerTls(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }
}

/// A PEM file's bytes: a regular file of at most 1 MiB (a FIFO or a device is refused).
fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    common::files::read_regular(path, 1 << 20).map_err(|e| e.to_string())
}

/// Every certificate in the PEM file `path` (at least one); errors start with the path.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

/// Reads the PEM certificates of a private CA (for a client's `ca_file`), as DER.
pub fn read_ca_file(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    Ok(read_certs(path)?.into_iter().map(|c| c.as_ref().to_vec()).collect())
}

/// Logs a warning when a server speaks plain HTTP on an address other than loopback.
pub fn warn_if_plain_and_exposed(addr: SocketAddr, tls: bool, what: &str) {
    if !tls && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "{what} serves plain HTTP on a non-loopback address: tokens and reports cross the network in clear \
             (give --tls-cert and --tls-key, or put a TLS proxy in front)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_certificate_files_are_errors_naming_the_flag_and_file() {
        let dir = std::env::temp_dir().join(format!("tb-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (empty, junk) = (dir.join("empty.pem"), dir.join("junk.pem"));
        std::fs::write(&empty, "").unwrap();
        std::fs::write(&junk, "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n").unwrap();
        let missing = dir.join("missing.pem");
        let e = ServerTls::from_pem_files(&missing, &missing).unwrap_err();
        assert!(e.starts_with("--tls-cert ") && e.contains("missing.pem"), "{e}");
        let e = ServerTls::from_pem_files(&empty, &empty).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        assert!(read_ca_file(&junk).unwrap_err().contains("junk.pem"));
        assert!(read_ca_file(&missing).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
