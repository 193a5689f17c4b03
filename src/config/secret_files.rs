//! Who besides acme-sds may open the files that hold its secrets (the TSIG key, the storage encryption key,
//! etcd's client key and password). As ssh treats its keys: a file every user of the host may read or
//! write (mode & 0o007) is refused, since anyone on the host could copy or swap the key; one its group may
//! (mode & 0o070) is a warning, unless that group is one acme-sds runs with (a dedicated system group, a
//! Kubernetes pod's `fsGroup`: sharing the key with it is the point).
//!
//! The configuration checks the files it names where it is read (`check`, the start, a reload); the TSIG key
//! is checked again each time it is read (at each order, so a rotated key written with the wrong mode is
//! caught), and the storage key when it is loaded. A file that cannot be looked at is left to the read,
//! which says why. Modes are of the file a symlink leads to (Kubernetes mounts Secrets as symlinks).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The mode of the file at `path` (symlinks followed), if it can be looked at.
fn mode(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.mode() & 0o7777)
}

/// What the `rwx` bits in `bits` (0..=7) let someone do.
fn access(bits: u32) -> String {
    let what: Vec<&str> = [(4, "read"), (2, "write"), (1, "execute")]
        .into_iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, what)| what)
        .collect();
    what.join(" and ")
}

/// Why `path` may not hold a secret, when every user of the host may read, write or execute it. Says the
/// mode and the fix; does not repeat the path but in the fix (the caller names it).
pub fn world_access(path: &Path) -> Option<String> {
    let mode = mode(path)?;
    let others = mode & 0o007;
    (others != 0).then(|| {
        format!(
            "mode {mode:04o} lets every user of this host {} it; a key file must be private to acme-sds's user: `chmod 600 {}` (in Kubernetes, the Secret volume's `defaultMode: 0400`, or 0440 with the pod's `fsGroup` for a non-root pod)",
            access(others),
            path.display()
        )
    })
}

/// Whether this process runs with group `gid` (its effective group, or a supplementary one).
fn own_group(gid: u32) -> bool {
    let gid = nix::unistd::Gid::from_raw(gid);
    nix::unistd::getegid() == gid || nix::unistd::getgroups().is_ok_and(|g| g.contains(&gid))
}

/// Why `path` should not hold a secret, when a group other than acme-sds's own may read, write or execute
/// it.
pub fn group_access(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.mode() & 0o7777;
    let group = (mode >> 3) & 0o007;
    (group != 0 && mode & 0o007 == 0 && !own_group(meta.gid())).then(|| {
        format!(
            "mode {mode:04o} lets members of its group (gid {}, not one acme-sds runs with) {} it; `chmod 600 {}`, or give the file acme-sds's own group",
            meta.gid(),
            access(group),
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn modes_are_told_with_what_they_allow_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "secret").unwrap();
        let chmod = |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
        // A group this process runs with may share the key: no warning.
        chmod(0o640).unwrap();
        assert!(group_access(&path).is_none(), "our own group");
        // Another group (only root can give the file one it is not in).
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        std::os::unix::fs::chown(&path, None, Some(65534)).unwrap();
        for (mode, world, group) in [
            (0o600, None, None),
            (0o400, None, None),
            (
                0o640,
                None,
                Some("mode 0640 lets members of its group (gid 65534"),
            ),
            (0o660, None, Some("read and write it")),
            (
                0o644,
                Some("mode 0644 lets every user of this host read it"),
                None,
            ),
            (0o602, Some("write it"), None),
            (0o601, Some("execute it"), None),
        ] {
            chmod(mode).unwrap();
            let (w, g) = (world_access(&path), group_access(&path));
            match world {
                Some(says) => {
                    let w = w.unwrap_or_else(|| panic!("{mode:o} refused"));
                    assert!(
                        w.contains(says) && w.contains(&format!("chmod 600 {}", path.display())),
                        "{w}"
                    );
                }
                None => assert!(w.is_none(), "{mode:o}: {w:?}"),
            }
            match group {
                Some(says) => assert!(g.as_deref().is_some_and(|g| g.contains(says)), "{g:?}"),
                None => assert!(g.is_none(), "{mode:o}: {g:?}"),
            }
        }
        assert!(world_access(&dir.path().join("absent")).is_none());
    }
}
