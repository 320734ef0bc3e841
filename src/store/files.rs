//! The files of a store kept on local disk: what vppd asks of them
//! whichever backend writes them.

use std::path::Path;

/// Bytes of the files under `dir`, subdirectories included; what cannot be
/// read counts nothing (a file the backend removes meanwhile, for instance).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The store holds sTokens: its directories are vppd's alone (0700), its
/// files 0600, whatever the umask was.
pub(crate) fn restrict_permissions(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fn walk(path: &Path) -> std::io::Result<()> {
            let meta = std::fs::symlink_metadata(path)?;
            if meta.is_dir() {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
                for entry in std::fs::read_dir(path)? {
                    walk(&entry?.path())?;
                }
            } else if meta.is_file() {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            }
            Ok(())
        }
        walk(dir)?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
