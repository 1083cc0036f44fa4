//! The config file as a source of desired state: read on demand, and
//! watched so that svclbd reloads it when it changes.
//!
//! The file's directory is watched (inotify, through `notify`), not the
//! file: editors and config managers replace a file by writing a temporary
//! one and renaming it over the original, which a watch on the old inode
//! would miss; Kubernetes-style `..data` symlink swaps happen in the same
//! directory too. Any event there is followed by a quiet period
//! ([`DEBOUNCE`]), then the file is read, and reloaded only if its bytes
//! differ from the last ones read, so unrelated files in the directory and
//! half-written saves cost nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{self, ConfigError};
use crate::model::Config;

/// How long the directory must stay quiet before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// The config file and the last bytes read from it.
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
    last_read: Option<Vec<u8>>,
}

impl ConfigFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ConfigFile {
            path: path.into(),
            last_read: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and validates the file, whatever it was before.
    pub fn load(&mut self) -> Result<Config, ConfigError> {
        let origin = self.path.display().to_string();
        let bytes = config::read_file(&self.path, &origin)?;
        let parsed = config::parse_bytes(&bytes, &origin);
        self.last_read = Some(bytes);
        parsed
    }

    /// Like [`ConfigFile::load`], but `None` when the bytes are the ones
    /// read last time (or the file cannot be read, which was reported).
    pub fn load_if_changed(&mut self) -> Option<Result<Config, ConfigError>> {
        match std::fs::read(&self.path) {
            Ok(bytes) if self.last_read.as_ref() == Some(&bytes) => None,
            Ok(_) => Some(self.load()),
            // Reported once per disappearance: a missing file is not new
            // bytes, but it is news the first time.
            Err(_) if self.last_read.is_none() => None,
            Err(_) => Some(self.load().inspect_err(|_| self.last_read = None)),
        }
    }
}

/// Events in the config file's directory.
pub struct FileWatch {
    events: mpsc::Receiver<()>,
    // Stops watching when dropped.
    _watcher: notify::RecommendedWatcher,
}

impl FileWatch {
    /// Watches the directory that holds `path`.
    pub fn new(path: &Path) -> Result<Self> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (tx, events) = mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let relevant = match &event {
                    Ok(e) => !matches!(e.kind, EventKind::Access(_)),
                    // An overflowed queue may have hidden a change.
                    Err(_) => true,
                };
                if relevant {
                    // A full channel already holds a wake-up.
                    let _ = tx.try_send(());
                }
            })
            .context("creating an inotify watcher")?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        Ok(FileWatch {
            events,
            _watcher: watcher,
        })
    }

    /// Waits for a change, then for [`DEBOUNCE`] without one.
    pub async fn changed(&mut self) {
        if self.events.recv().await.is_none() {
            // The watcher thread is gone: never wake up again.
            std::future::pending::<()>().await;
        }
        loop {
            match tokio::time::timeout(DEBOUNCE, self.events.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("svclb-file-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const ONE: &str = "[[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\n";
    const TWO: &str = "[[service]]\nname = \"b\"\nvip = \"10.0.0.2\"\n";

    #[test]
    fn load_if_changed_compares_bytes() {
        let dir = temp_dir("bytes");
        let path = dir.join("svclb.toml");
        std::fs::write(&path, ONE).unwrap();
        let mut file = ConfigFile::new(&path);
        assert_eq!(file.load().unwrap().services[0].name, "a");
        assert!(file.load_if_changed().is_none());
        std::fs::write(&path, TWO).unwrap();
        assert_eq!(
            file.load_if_changed().unwrap().unwrap().services[0].name,
            "b"
        );
        assert!(file.load_if_changed().is_none());
        // A bad file is reported once, and again only when it changes.
        std::fs::write(&path, "[[service]]\nname = 1\n").unwrap();
        let e = file.load_if_changed().unwrap().unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(file.load_if_changed().is_none());
        // A missing file, likewise.
        std::fs::remove_file(&path).unwrap();
        assert!(file
            .load_if_changed()
            .unwrap()
            .unwrap_err()
            .message
            .contains("cannot read"));
        assert!(file.load_if_changed().is_none());
        std::fs::write(&path, ONE).unwrap();
        assert!(file.load_if_changed().unwrap().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn watch_sees_writes_and_renames() {
        let dir = temp_dir("watch");
        let path = dir.join("svclb.toml");
        std::fs::write(&path, ONE).unwrap();
        let mut watch = FileWatch::new(&path).unwrap();
        let within = Duration::from_secs(5);

        std::fs::write(&path, TWO).unwrap();
        tokio::time::timeout(within, watch.changed())
            .await
            .expect("an in-place write is seen");

        let tmp = dir.join(".svclb.toml.swp");
        std::fs::write(&tmp, ONE).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::timeout(within, watch.changed())
            .await
            .expect("a rename over the file is seen");

        // Quiet directory: no wake-up.
        assert!(
            tokio::time::timeout(Duration::from_millis(500), watch.changed())
                .await
                .is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
