//! A QMP client: QEMU's JSON control protocol over a Unix socket.
//!
//! QEMU greets, the client negotiates capabilities, then sends one command at a
//! time, each with an `id` it expects back on the answer. Asynchronous events
//! (`MIGRATION`, `STOP`, `RESUME`, `SHUTDOWN`, ...) arrive between answers;
//! they are kept, in order and bounded, for the caller to take. Every call has
//! a deadline, so a QEMU that stops answering makes a call fail with
//! [`QmpError::Timeout`] rather than hang; nothing QEMU sends is trusted to
//! have any shape — a message that is not what QMP promises is a
//! [`QmpError::Protocol`].

use super::lines::LineStream;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

/// The longest QMP message taken (query-migrate and friends are a few KiB).
const MAX_MESSAGE: usize = 1 << 20;
/// Events kept before the oldest are dropped.
const MAX_EVENTS: usize = 1024;

/// Why a QMP call failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QmpError {
    #[error("QMP socket: {0}")]
    Io(String),
    #[error("QMP connection closed by QEMU")]
    Closed,
    #[error("QMP `{command}` got no answer within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("QMP `{command}` failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP protocol: {0}")]
    Protocol(String),
}

/// An asynchronous event QEMU sent.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// `MIGRATION`, `STOP`, `RESUME`, `SHUTDOWN`, ...
    pub name: String,
    /// The event's `data` (`Value::Null` when it has none).
    pub data: Value,
}

/// One message from QEMU, classified.
#[derive(Debug, PartialEq)]
enum Message {
    Greeting,
    Return {
        id: Option<Value>,
        value: Value,
    },
    Error {
        id: Option<Value>,
        class: String,
        desc: String,
    },
    Event(QmpEvent),
}

fn classify(line: &[u8]) -> Result<Message, QmpError> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| QmpError::Protocol(format!("not JSON ({e}): {}", lossy(line))))?;
    let Value::Object(mut map) = value else {
        return Err(QmpError::Protocol(format!(
            "not an object: {}",
            lossy(line)
        )));
    };
    let id = map.remove("id");
    if map.contains_key("QMP") {
        return Ok(Message::Greeting);
    }
    if let Some(value) = map.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(error) = map.remove("error") {
        let field = |name: &str| {
            error
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string()
        };
        return Ok(Message::Error {
            id,
            class: field("class"),
            desc: field("desc"),
        });
    }
    if let Some(Value::String(name)) = map.remove("event") {
        let data = map.remove("data").unwrap_or(Value::Null);
        return Ok(Message::Event(QmpEvent { name, data }));
    }
    Err(QmpError::Protocol(format!(
        "neither answer nor event: {}",
        lossy(line)
    )))
}

fn lossy(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    text.chars().take(200).collect()
}

/// A connected, negotiated QMP session.
pub struct Qmp {
    lines: LineStream,
    next_id: u64,
    events: VecDeque<QmpEvent>,
    /// How long one command may take to be answered.
    timeout: Duration,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and enters
    /// command mode (`qmp_capabilities`), each within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let lines =
            LineStream::connect(path, MAX_MESSAGE).map_err(|e| QmpError::Io(e.to_string()))?;
        let mut qmp = Qmp {
            lines,
            next_id: 1,
            events: VecDeque::new(),
            timeout,
        };
        let deadline = Instant::now() + timeout;
        loop {
            match qmp.next_message("greeting", deadline)? {
                Message::Greeting => break,
                Message::Event(event) => qmp.keep(event),
                other => {
                    return Err(QmpError::Protocol(format!(
                        "expected the greeting, got {other:?}"
                    )))
                }
            }
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` and returns its `return` value, or the
    /// error QEMU answered with; fails with [`QmpError::Timeout`] when no
    /// answer comes within the session's timeout.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = Map::new();
        request.insert("execute".into(), json!(command));
        if let Some(arguments) = arguments {
            request.insert("arguments".into(), arguments);
        }
        request.insert("id".into(), json!(id));
        let mut bytes = Value::Object(request).to_string().into_bytes();
        bytes.push(b'\n');
        let deadline = Instant::now() + self.timeout;
        self.lines
            .send(&bytes, deadline)
            .map_err(|e| io_error(command, self.timeout, e))?;
        loop {
            match self.next_message(command, deadline)? {
                Message::Event(event) => self.keep(event),
                // An answer to an earlier command that timed out: not ours.
                Message::Return { id: other, .. } | Message::Error { id: other, .. }
                    if other != Some(json!(id)) => {}
                Message::Return { value, .. } => return Ok(value),
                Message::Error { class, desc, .. } => {
                    return Err(QmpError::Command {
                        command: command.into(),
                        class,
                        desc,
                    })
                }
                Message::Greeting => {
                    return Err(QmpError::Protocol("a second greeting".into()));
                }
            }
        }
    }

    /// Waits until an event arrives or `deadline` passes, keeping whatever
    /// arrives; returns whether an event came. Lets a caller wait for a state
    /// change without a fixed sleep.
    pub fn wait_for_event(&mut self, deadline: Instant) -> Result<bool, QmpError> {
        match self.lines.read_line(deadline) {
            Ok(None) => Ok(false),
            Ok(Some(line)) => match classify(&line)? {
                Message::Event(event) => {
                    self.keep(event);
                    Ok(true)
                }
                // A late answer to a command that timed out.
                _ => Ok(false),
            },
            Err(e) => Err(io_error("(event)", self.timeout, e)),
        }
    }

    /// Takes the events received so far, oldest first.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    fn keep(&mut self, event: QmpEvent) {
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    fn next_message(&mut self, command: &str, deadline: Instant) -> Result<Message, QmpError> {
        match self.lines.read_line(deadline) {
            Ok(Some(line)) => classify(&line),
            Ok(None) => Err(QmpError::Timeout {
                command: command.into(),
                after: self.timeout,
            }),
            Err(e) => Err(io_error(command, self.timeout, e)),
        }
    }
}

fn io_error(command: &str, after: Duration, e: std::io::Error) -> QmpError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::ConnectionReset => QmpError::Closed,
        std::io::ErrorKind::TimedOut => QmpError::Timeout {
            command: command.into(),
            after,
        },
        _ => QmpError::Io(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn messages_are_classified_and_odd_ones_refused() {
        assert_eq!(
            classify(br#"{"QMP": {"version": {}, "capabilities": []}}"#),
            Ok(Message::Greeting)
        );
        assert_eq!(
            classify(br#"{"return": {}, "id": 3}"#),
            Ok(Message::Return {
                id: Some(json!(3)),
                value: json!({})
            })
        );
        assert_eq!(
            classify(br#"{"error": {"class": "GenericError", "desc": "no"}}"#),
            Ok(Message::Error {
                id: None,
                class: "GenericError".into(),
                desc: "no".into()
            })
        );
        assert_eq!(
            classify(br#"{"event": "MIGRATION", "data": {"status": "active"}, "timestamp": {}}"#),
            Ok(Message::Event(QmpEvent {
                name: "MIGRATION".into(),
                data: json!({"status": "active"})
            }))
        );
        for bad in [&b"{"[..], b"[1]", br#"{"event": 5}"#, b"{}"] {
            assert!(
                matches!(classify(bad), Err(QmpError::Protocol(_))),
                "{bad:?}"
            );
        }
    }

    /// A fake QEMU that greets, answers `qmp_capabilities`, sends an event,
    /// answers `query-status` with an error, then stops answering.
    #[test]
    fn a_session_keeps_events_types_errors_and_times_out_when_qemu_is_silent() {
        let path = std::env::temp_dir().join(format!("ferry-qmp-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut out = stream.try_clone().unwrap();
            let mut input = BufReader::new(stream);
            writeln!(out, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut line = String::new();
            input.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities") && line.contains(r#""id":1"#));
            writeln!(out, r#"{{"return": {{}}, "id": 1}}"#).unwrap();
            line.clear();
            input.read_line(&mut line).unwrap();
            writeln!(out, r#"{{"event": "STOP", "timestamp": {{}}}}"#).unwrap();
            writeln!(out, r#"{{"return": {{}}, "id": 99}}"#).unwrap();
            writeln!(
                out,
                r#"{{"error": {{"class": "GenericError", "desc": "nope"}}, "id": 2}}"#
            )
            .unwrap();
            line.clear();
            // Reads the next command and never answers it.
            input.read_line(&mut line).unwrap();
            line.clear();
            let _ = input.read_line(&mut line);
        });
        let mut qmp = Qmp::connect(&path, Duration::from_millis(300)).unwrap();
        assert_eq!(
            qmp.execute("query-status", None),
            Err(QmpError::Command {
                command: "query-status".into(),
                class: "GenericError".into(),
                desc: "nope".into()
            })
        );
        let events = qmp.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].name, "STOP");
        let started = Instant::now();
        assert!(matches!(
            qmp.execute("query-migrate", None),
            Err(QmpError::Timeout { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(qmp);
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
