//! Watches QEMU processes from outside Ferry: every QEMU guest has a second
//! QMP monitor for watchers (`observe.sock` in its run directory, which
//! Ferry never uses). A watcher thread finds them under a directory, asks
//! each `query-status` over and over, and records any moment at which more
//! than one reported running — two copies of one VM unpaused.

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a watch saw.
#[derive(Debug, Default)]
pub struct Watched {
    /// Rounds over every QEMU found.
    pub samples: u64,
    /// QEMU monitors seen over the whole watch.
    pub processes: usize,
    /// Rounds in which exactly one QEMU ran.
    pub one_running: u64,
    /// Every round in which two or more ran, with their run directories.
    pub twice: Vec<String>,
}

pub struct QemuWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Watched>>,
}

/// One observer connection.
struct Monitor {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Monitor {
    fn connect(socket: &Path) -> std::io::Result<Monitor> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let writer = stream.try_clone()?;
        let mut m = Monitor {
            reader: BufReader::new(stream),
            writer,
        };
        m.answer(None)?; // the greeting
        m.ask("qmp_capabilities")?;
        Ok(m)
    }

    /// Sends `command` and returns its answer (events in between skipped).
    fn ask(&mut self, command: &str) -> std::io::Result<Value> {
        writeln!(self.writer, "{{\"execute\":\"{command}\"}}")?;
        self.answer(Some("return"))
    }

    fn answer(&mut self, key: Option<&str>) -> std::io::Result<Value> {
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            match key {
                None if v.get("QMP").is_some() => return Ok(v),
                Some(k) if v.get(k).is_some() => return Ok(v[k].clone()),
                Some(_) if v.get("error").is_some() => {
                    return Err(std::io::Error::other(v["error"].to_string()))
                }
                _ => {}
            }
        }
    }
}

/// Every `observe.sock` under `root` (two levels deep at most).
fn sockets(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.file_name().is_some_and(|n| n == "observe.sock") {
                found.push(path);
            } else if depth < 3 && path.is_dir() {
                dirs.push((path, depth + 1));
            }
        }
    }
    found
}

impl QemuWatch {
    /// Watches every QEMU whose run directory appears under `root`.
    pub fn start(root: &Path) -> QemuWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, root) = (stop.clone(), root.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut seen = Watched::default();
            let mut monitors: BTreeMap<PathBuf, Monitor> = BTreeMap::new();
            let mut gone: Vec<PathBuf> = Vec::new();
            while !flag.load(Ordering::Acquire) {
                for socket in sockets(&root) {
                    if !monitors.contains_key(&socket) && !gone.contains(&socket) {
                        if let Ok(m) = Monitor::connect(&socket) {
                            monitors.insert(socket, m);
                            seen.processes += 1;
                        }
                    }
                }
                let mut running = Vec::new();
                let mut lost = Vec::new();
                for (socket, m) in monitors.iter_mut() {
                    match m.ask("query-status") {
                        Ok(status) if status["running"].as_bool() == Some(true) => {
                            running.push(socket.display().to_string())
                        }
                        Ok(_) => {}
                        // The process ended (destroyed, or its node died).
                        Err(_) => lost.push(socket.clone()),
                    }
                }
                for socket in lost {
                    monitors.remove(&socket);
                    gone.push(socket);
                }
                seen.samples += 1;
                match running.len() {
                    0 => {}
                    1 => seen.one_running += 1,
                    _ => seen.twice.push(running.join(" and ")),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        });
        QemuWatch {
            stop,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) -> Watched {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}
