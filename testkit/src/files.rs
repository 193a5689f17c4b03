//! Certificate files changed the ways real tools change them: rename over, rewrite in place, and a
//! Kubernetes Secret volume's `..data` symlink swap; key files written private.

use std::path::{Path, PathBuf};

use crate::*;

// ---------- secrets ----------

/// Writes `bytes` to `path` readable and writable by this user only (0600), as a key file must be:
/// acme-sds refuses a key file every user of the host may open.
pub fn write_private(path: &Path, bytes: impl AsRef<[u8]>) {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    // An existing file keeps its mode on open: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .unwrap();
    f.write_all(bytes.as_ref()).unwrap();
}

// ---------- file rotation ----------

/// Writes a temp file next to `path` and renames it over `path` (how most tools replace files).
pub fn replace_by_rename(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Truncates and rewrites `path` in place (same inode).
pub fn rewrite_in_place(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

/// A directory laid out like a mounted Kubernetes Secret: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<generation>`; an update writes a new generation and swaps `..data` atomically.
pub struct K8sSecretDir {
    pub dir: PathBuf,
    generation: u32,
}

impl K8sSecretDir {
    pub fn new(dir: &Path, leaf: &Leaf) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut s = K8sSecretDir {
            dir: dir.to_owned(),
            generation: 0,
        };
        s.update(leaf);
        std::os::unix::fs::symlink("..data/tls.crt", dir.join("tls.crt")).unwrap();
        std::os::unix::fs::symlink("..data/tls.key", dir.join("tls.key")).unwrap();
        s
    }

    pub fn update(&mut self, leaf: &Leaf) {
        self.generation += 1;
        let gen_name = format!("..2026_11_25_{:04}", self.generation);
        let gen_dir = self.dir.join(&gen_name);
        std::fs::create_dir(&gen_dir).unwrap();
        std::fs::write(gen_dir.join("tls.crt"), &leaf.chain_pem).unwrap();
        std::fs::write(gen_dir.join("tls.key"), &leaf.key_pem).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&gen_name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    pub fn crt(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }
}
