//! Watches config files and directories and reports *effective content changes*, debounced.
//!
//! [`Watch::start`] puts a [`notify`] watch on each path's parent directory (non-recursively) and
//! on the path itself when it is a directory, so in-place writes, rename-on-save, delete + create
//! and Kubernetes ConfigMap/Secret `..data` swaps are all seen. Events arrive on notify's thread,
//! are filtered by name there and cross to tokio as a "something happened" flag over a one-slot
//! channel. [`Watch::changed`] debounces them (`quiet` after the last event, at most `max_delay`
//! after the first), then compares the [`fingerprint`] of every watched path with the last one
//! reported and resolves with a [`Change`] only when one differs. The config reloader turns that
//! into a reload of Outrigger's own config or an action on the app (signal, webhook, restart).
//!
//! Limits: fingerprints are computed inline on the runtime thread, which is fine for config-sized
//! files, not for large trees. A burst's clock starts when `changed` is polled, so events that
//! came while nobody was waiting are debounced from then. A watched directory that is deleted
//! and recreated is re-watched at the next debounced check (before its fingerprint is taken, so
//! nothing written in between is missed); deleting or replacing a *parent* directory ends all
//! events for the paths in it. A file path that is a symlink out of its directory is seen to
//! change only when the link itself, or a `..` name beside it (ConfigMap style), changes.

use std::ffi::OsStr;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

/// What to watch and how to debounce it.
#[derive(Clone, Debug)]
pub struct WatchSpec {
    /// Files or directories. Each may be absent at start; its parent directory must exist.
    pub paths: Vec<PathBuf>,
    /// Check once no event has come for this long...
    pub quiet: Duration,
    /// ...but never later than this after the first event of a burst.
    pub max_delay: Duration,
}

/// An effective change: the watched paths (as given in [`WatchSpec`]) whose fingerprint differs
/// from the last reported one, or from the one taken at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// In the order of [`WatchSpec::paths`].
    pub paths: Vec<PathBuf>,
}

/// Watches the paths of a [`WatchSpec`]; see the module docs.
#[derive(Debug)]
pub struct Watch {
    /// Kept alive: dropping it stops the events (and closes the channel).
    watcher: RecommendedWatcher,
    events: mpsc::Receiver<()>,
    targets: Vec<Target>,
    quiet: Duration,
    max_delay: Duration,
    /// First and latest event of the burst being debounced, `None` while idle. Kept here rather
    /// than in the `changed` future, so dropping that future inside `select!` loses nothing.
    burst: Option<(Instant, Instant)>,
}

/// One watched path.
#[derive(Debug)]
struct Target {
    /// As given, for [`Change`].
    given: PathBuf,
    /// The canonical parent joined with the file name: what notify reports events under.
    path: PathBuf,
    parent: PathBuf,
    /// The fingerprint taken at start or last reported.
    last: u64,
}

impl Watch {
    /// Starts watching; Err (clear message naming the path) when a path's parent directory does
    /// not exist, or a watch cannot be set up.
    pub fn start(spec: WatchSpec) -> io::Result<Watch> {
        let mut targets = spec
            .paths
            .iter()
            .map(|given| resolve(given))
            .collect::<io::Result<Vec<_>>>()?;
        let names: Vec<_> = targets
            .iter()
            .map(|t| (t.path.clone(), t.parent.clone()))
            .collect();
        let (tx, events) = mpsc::channel(1);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let relevant = match res {
                Ok(event) => is_relevant(&event, &names),
                Err(error) => {
                    // Something may have been missed: let the fingerprints decide.
                    tracing::warn!(%error, "file watch error");
                    true
                }
            };
            if relevant {
                // Full means the flag is already set, which is all the debouncer needs.
                let _ = tx.try_send(());
            }
        })
        .map_err(|e| io::Error::other(format!("cannot start the file watcher: {e}")))?;
        for t in &targets {
            let cannot = |e| io::Error::other(format!("cannot watch {}: {e}", t.given.display()));
            watcher
                .watch(&t.parent, RecursiveMode::NonRecursive)
                .map_err(cannot)?;
            if t.path.is_dir() {
                watcher
                    .watch(&t.path, RecursiveMode::NonRecursive)
                    .map_err(cannot)?;
            }
        }
        // After the watches: a change racing start-up is then either in the fingerprint or seen.
        for t in &mut targets {
            t.last = fingerprint(&t.path);
        }
        Ok(Watch {
            watcher,
            events,
            targets,
            quiet: spec.quiet,
            max_delay: spec.max_delay,
            burst: None,
        })
    }

    /// Resolves once per effective change (cancel-safe enough to be used inside tokio::select!
    /// in a loop: the debounce state lives in `self`).
    pub async fn changed(&mut self) -> Change {
        loop {
            let Some((first, latest)) = self.burst else {
                if self.events.recv().await.is_none() {
                    // Unreachable while `self.watcher` holds the sender; never spin.
                    std::future::pending::<()>().await;
                }
                let now = Instant::now();
                self.burst = Some((now, now));
                continue;
            };
            let deadline = (latest + self.quiet).min(first + self.max_delay);
            tokio::select! {
                biased;
                Some(()) = self.events.recv() => self.burst = Some((first, Instant::now())),
                () = sleep_until(deadline) => {
                    self.burst = None;
                    if let Some(change) = self.check() {
                        return change;
                    }
                }
            }
        }
    }

    /// Re-watches directories (they may have been recreated), then compares fingerprints.
    fn check(&mut self) -> Option<Change> {
        let mut paths = Vec::new();
        for t in &mut self.targets {
            if t.path.is_dir()
                && let Err(error) = self.watcher.watch(&t.path, RecursiveMode::NonRecursive)
            {
                tracing::warn!(%error, path = %t.path.display(), "cannot re-watch directory");
            }
            let now = fingerprint(&t.path);
            if now != t.last {
                t.last = now;
                paths.push(t.given.clone());
            }
        }
        if paths.is_empty() {
            tracing::debug!("watched paths touched, content unchanged");
            return None;
        }
        tracing::debug!(?paths, "watched content changed");
        Some(Change { paths })
    }
}

/// Splits a path into its canonical parent and file name; Err when the parent is not a directory.
fn resolve(given: &Path) -> io::Result<Target> {
    let fail = |kind, why: String| {
        io::Error::new(kind, format!("cannot watch {}: {why}", given.display()))
    };
    let Some(name) = given.file_name() else {
        let why = "expected a path ending in a file or directory name".to_string();
        return Err(fail(io::ErrorKind::InvalidInput, why));
    };
    let parent = given.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = parent.unwrap_or(Path::new("."));
    let shown = parent.display();
    let canonical = std::fs::canonicalize(parent)
        .map_err(|e| fail(e.kind(), format!("parent directory {shown}: {e}")))?;
    if !canonical.is_dir() {
        let why = format!("parent {shown} is not a directory");
        return Err(fail(io::ErrorKind::NotADirectory, why));
    }
    let (path, given) = (canonical.join(name), given.to_path_buf());
    Ok(Target {
        given,
        path,
        parent: canonical,
        last: 0,
    })
}

/// Whether an event may concern one of the `(path, parent)` pairs.
fn is_relevant(event: &notify::Event, names: &[(PathBuf, PathBuf)]) -> bool {
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        // Opens and read-only closes, our own fingerprint reads among them.
        EventKind::Access(_) => return false,
        _ => {}
    }
    // No path: e.g. a rescan after the kernel's queue overflowed.
    event.paths.is_empty()
        || event
            .paths
            .iter()
            .any(|p| names.iter().any(|(path, parent)| concerns(p, path, parent)))
}

/// The path itself, an entry of it (a directory), its parent, or a `..` name beside it (the
/// ConfigMap machinery); other names beside a file are noise.
fn concerns(event_path: &Path, path: &Path, parent: &Path) -> bool {
    if event_path == path || event_path == parent {
        return true;
    }
    match (event_path.parent(), event_path.file_name()) {
        (Some(dir), _) if dir == path => true,
        (Some(dir), Some(name)) if dir == parent => name.as_encoded_bytes().starts_with(b".."),
        _ => false,
    }
}

/// Fingerprint of a path's content now: file → its bytes (following symlinks); directory → sorted
/// (name, bytes) of its regular, non-hidden files (following symlinks; skip names starting with
/// '.', ending with '~', '.swp', '.swx', '.tmp'); missing → a distinct "absent" value.
///
/// Comparable within one process only. Unreadable paths hash their error kind.
pub fn fingerprint(path: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => "absent".hash(&mut h),
        Err(e) => ("unreadable", e.kind()).hash(&mut h),
        Ok(meta) if meta.is_dir() => {
            "dir".hash(&mut h);
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut files: Vec<_> = entries
                        .filter_map(Result::ok)
                        .filter(|e| !is_noise(&e.file_name()))
                        // metadata() follows symlinks, unlike DirEntry::file_type().
                        .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.is_file()))
                        .map(|e| (e.file_name(), e.path()))
                        .collect();
                    files.sort();
                    for (name, file) in files {
                        name.as_encoded_bytes().hash(&mut h);
                        hash_file(&file, &mut h);
                    }
                }
                Err(e) => ("unreadable", e.kind()).hash(&mut h),
            }
        }
        Ok(_) => {
            "file".hash(&mut h);
            hash_file(path, &mut h);
        }
    }
    h.finish()
}

fn hash_file(path: &Path, h: &mut DefaultHasher) {
    match std::fs::read(path) {
        Ok(bytes) => bytes.hash(h),
        Err(e) => ("unreadable", e.kind()).hash(h),
    }
}

/// Hidden files and editor leftovers, skipped in directory fingerprints.
fn is_noise(name: &OsStr) -> bool {
    let n = name.as_encoded_bytes();
    let suffixes: [&[u8]; 4] = [b"~", b".swp", b".swx", b".tmp"];
    n.starts_with(b".") || suffixes.iter().any(|s| n.ends_with(s))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tempfile::TempDir;
    use tokio::task::JoinHandle;
    use tokio::time::{sleep, timeout};

    use super::*;

    const QUIET: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_millis(500);

    fn spec(path: &Path) -> WatchSpec {
        WatchSpec {
            paths: vec![path.to_path_buf()],
            quiet: QUIET,
            max_delay: MAX,
        }
    }

    /// A temp dir with `app.yaml` (holding `content`, if any) and a watch on that file.
    fn watched_file(content: Option<&str>) -> (TempDir, PathBuf, Watch) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("app.yaml");
        if let Some(content) = content {
            fs::write(&file, content).unwrap();
        }
        let watch = Watch::start(spec(&file)).unwrap();
        (dir, file, watch)
    }

    async fn next(w: &mut Watch) -> Change {
        timeout(Duration::from_secs(2), w.changed())
            .await
            .expect("a change within 2s")
    }

    async fn assert_quiet(w: &mut Watch) {
        let got = timeout(QUIET * 3, w.changed()).await;
        assert!(got.is_err(), "unexpected change: {got:?}");
    }

    #[tokio::test]
    async fn in_place_write_fires_once() {
        let (_dir, file, mut w) = watched_file(Some("a: 1"));
        fs::write(&file, "a: 2").unwrap();
        assert_eq!(next(&mut w).await.paths, vec![file.clone()]);
        assert_quiet(&mut w).await;
    }

    #[tokio::test]
    async fn identical_content_fires_nothing() {
        let (_dir, file, mut w) = watched_file(Some("a: 1"));
        fs::write(&file, "a: 1").unwrap();
        assert_quiet(&mut w).await;
        // Still watching: a real change after that is reported.
        fs::write(&file, "a: 2").unwrap();
        next(&mut w).await;
    }

    #[tokio::test]
    async fn rename_on_save_fires_once() {
        let (dir, file, mut w) = watched_file(Some("a: 1"));
        let tmp = dir.path().join("app.yaml.tmp");
        fs::write(&tmp, "a: 2").unwrap();
        fs::rename(&tmp, &file).unwrap();
        assert_eq!(next(&mut w).await.paths, vec![file.clone()]);
        assert_quiet(&mut w).await;
    }

    /// A ConfigMap volume update, as the kubelet does it.
    fn publish(volume: &Path, stamp: &str, content: &str, old: Option<&str>) {
        fs::create_dir(volume.join(stamp)).unwrap();
        fs::write(volume.join(stamp).join("app.yaml"), content).unwrap();
        symlink(stamp, volume.join("..data_tmp")).unwrap();
        fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
        if let Some(old) = old {
            fs::remove_dir_all(volume.join(old)).unwrap();
        }
    }

    async fn configmap_swap_fires_once(watch_volume: bool) {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("config");
        fs::create_dir(&volume).unwrap();
        let (old, new) = ("..2026_11_27_10_00_00.123", "..2026_11_27_10_05_00.456");
        publish(&volume, old, "a: 1", None);
        symlink("..data/app.yaml", volume.join("app.yaml")).unwrap();
        let watched = if watch_volume {
            volume.clone()
        } else {
            volume.join("app.yaml")
        };
        let mut w = Watch::start(spec(&watched)).unwrap();
        publish(&volume, new, "a: 2", Some(old));
        assert_eq!(next(&mut w).await.paths, vec![watched]);
        assert_quiet(&mut w).await;
    }

    #[tokio::test]
    async fn configmap_swap_fires_once_watching_the_volume() {
        configmap_swap_fires_once(true).await;
    }

    #[tokio::test]
    async fn configmap_swap_fires_once_watching_the_symlink() {
        configmap_swap_fires_once(false).await;
    }

    /// Writes `a: 1` .. `a: count` to `file`, `every` apart, then sets `done`.
    fn writer(file: &Path, count: u32, every: Duration, done: Arc<AtomicBool>) -> JoinHandle<()> {
        let file = file.to_path_buf();
        tokio::spawn(async move {
            for i in 1..=count {
                fs::write(&file, format!("a: {i}")).unwrap();
                sleep(every).await;
            }
            done.store(true, Ordering::SeqCst);
        })
    }

    #[tokio::test]
    async fn burst_inside_quiet_fires_once() {
        let (_dir, file, mut w) = watched_file(Some("a: 0"));
        let writes = writer(&file, 10, Duration::from_millis(5), Arc::default());
        next(&mut w).await;
        assert_quiet(&mut w).await;
        writes.await.unwrap();
    }

    #[tokio::test]
    async fn continuous_writes_fire_by_max_delay() {
        let (_dir, file, mut w) = watched_file(Some("a: 0"));
        let done = Arc::new(AtomicBool::new(false));
        // 30 × quiet/2 = 3 × max_delay of writes.
        let writes = writer(&file, 30, QUIET / 2, done.clone());
        next(&mut w).await;
        assert!(
            !done.load(Ordering::SeqCst),
            "no change reported while writes went on"
        );
        writes.abort();
    }

    #[tokio::test]
    async fn file_created_after_start_fires() {
        let (_dir, file, mut w) = watched_file(None);
        fs::write(&file, "a: 1").unwrap();
        assert_eq!(next(&mut w).await.paths, vec![file.clone()]);
        assert_quiet(&mut w).await;
    }

    #[test]
    fn missing_parent_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("missing").join("app.yaml");
        let err = Watch::start(spec(&file)).expect_err("start must fail");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );
    }
}
