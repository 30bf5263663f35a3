//! The CA's state directory.
//!
//! | file | written by | holds |
//! |---|---|---|
//! | `root.pem`, `root-key.pem` | the CA, on first start (key mode 0600) | the signing root |
//! | `trusted/*.pem` | the operator | more roots to trust (rotation) |
//! | `bundle.pem` | the CA, at every start | every trusted root, the signing one first |
//! | `addr` | the CA, once listening | its address |
//!
//! Everything the CA writes is written whole (a temporary file, then rename), so a
//! reader never sees half a file.

use std::{
    io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use tracing::{info, warn};

use super::Authority;

/// Lifetime of a root made on first start.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {message}")]
    Material { path: PathBuf, message: String },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// The signing authority of `dir`: its root, plus every root of `dir/trusted/`
/// in the bundle. On first start (neither root file there) a new root is made.
pub fn load_authority(dir: &Path, trust_domain: &str) -> Result<Authority, Error> {
    let mut authority = load_or_create_root(dir, trust_domain)?;
    // The signing root may be in trusted/ too (a copy kept during a rotation).
    let signing = ::pem::parse(authority.root_pem()).map(|p| p.into_contents());
    for (der, pem) in trusted_roots(&dir.join("trusted"))? {
        if signing.as_ref().ok() != Some(&der) {
            authority.trust_also(pem);
        }
    }
    Ok(authority)
}

/// Writes `bundle.pem`: every root of `authority`, the signing one first.
pub fn write_bundle(dir: &Path, authority: &Authority) -> Result<(), Error> {
    write_atomic(
        &dir.join("bundle.pem"),
        authority.bundle().concat().as_bytes(),
        0o644,
    )
}

/// Writes `addr`: where the CA listens.
pub fn write_addr(dir: &Path, addr: std::net::SocketAddr) -> Result<(), Error> {
    write_atomic(&dir.join("addr"), format!("{addr}\n").as_bytes(), 0o644)
}

/// Loads `root.pem` and `root-key.pem` from `dir`, or makes them if neither exists.
fn load_or_create_root(dir: &Path, trust_domain: &str) -> Result<Authority, Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error(dir))?;
    let cert_path = dir.join("root.pem");
    let key_path = dir.join("root-key.pem");
    let exists = |p: &Path| p.try_exists().map_err(io_error(p));
    match (exists(&cert_path)?, exists(&key_path)?) {
        (true, true) => {
            let cert = std::fs::read_to_string(&cert_path).map_err(io_error(&cert_path))?;
            let key = std::fs::read_to_string(&key_path).map_err(io_error(&key_path))?;
            let mode = std::fs::metadata(&key_path)
                .map_err(io_error(&key_path))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                warn!(
                    path = %key_path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "the root key is readable by others; chmod 600 it"
                );
            }
            let expired = ::pem::parse(&cert).ok().and_then(|p| {
                let (_, x509) = x509_parser::parse_x509_certificate(p.contents()).ok()?;
                let not_after = x509.validity().not_after;
                (!x509.validity().is_valid()).then(|| not_after.to_string())
            });
            if let Some(not_after) = expired {
                return Err(Error::Material {
                    path: cert_path,
                    message: format!("the root is not valid now (valid until {not_after})"),
                });
            }
            Authority::from_pem(&cert, &key).map_err(|e| Error::Material {
                path: dir.to_owned(),
                message: e.to_string(),
            })
        }
        (false, false) => {
            let authority =
                Authority::generate(trust_domain, ROOT_VALIDITY).map_err(|e| Error::Material {
                    path: dir.to_owned(),
                    message: e.to_string(),
                })?;
            write_atomic(&key_path, authority.key_pem().as_bytes(), 0o600)?;
            write_atomic(&cert_path, authority.root_pem().as_bytes(), 0o644)?;
            info!(dir = %dir.display(), trust_domain, "new root generated");
            Ok(authority)
        }
        _ => Err(Error::Material {
            path: dir.to_owned(),
            message: "only one of root.pem and root-key.pem exists; restore the other, or \
                      remove both to start a new root (agents must then get the new bundle)"
                .into(),
        }),
    }
}

/// Every certificate in `<dir>/trusted/*.pem` (in file-name order): DER and PEM
/// of each. A missing directory is no roots.
fn trusted_roots(dir: &Path) -> Result<Vec<(Vec<u8>, String)>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(dir)(e)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_error(dir))?.path();
        if path.extension().is_some_and(|e| e == "pem") {
            paths.push(path);
        }
    }
    paths.sort();
    let mut roots = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
        let bad = |message: String| Error::Material {
            path: path.clone(),
            message,
        };
        let certs = ::pem::parse_many(&text).map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("holds no certificate".into()));
        }
        for cert in certs {
            if cert.tag() != "CERTIFICATE" {
                return Err(bad(format!(
                    "holds a {} block; trusted/ is for root certificates only",
                    cert.tag()
                )));
            }
            let (_, x509) = x509_parser::parse_x509_certificate(cert.contents())
                .map_err(|e| bad(format!("bad certificate: {e}")))?;
            if !x509.is_ca() {
                return Err(bad("holds a certificate that is not a CA".into()));
            }
            let config = ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF);
            let pem = ::pem::encode_config(&cert, config);
            roots.push((cert.into_contents(), pem));
        }
    }
    Ok(roots)
}

/// Writes `path` whole or not at all (a temporary file beside it, then rename).
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    use std::io::Write as _;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_error(&tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}
