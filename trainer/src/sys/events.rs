//! The JSON Lines event stream on stdout (`charlm_contract::events`, docs/contract.md): one
//! object per line, written whole with one locked write, and only when `--log-format` asks for
//! it. A reader that went away (a closed pipe) never stops the work: lines are then dropped.

use std::io::Write;

use charlm_contract::events::{Event, Line, SCHEMA};
use serde::Serialize;

use super::flags::LogFormat;

#[derive(Clone, Copy, Debug)]
pub struct Events {
    on: bool,
    rank: Option<u64>,
}

impl Events {
    /// The stream of the process of global `rank` (`None` for `launch`'s lines about its node).
    pub fn new(format: LogFormat, rank: Option<u64>) -> Self {
        Self {
            on: format.json(),
            rank,
        }
    }

    /// No stream (library callers, tests).
    pub fn off() -> Self {
        Self {
            on: false,
            rank: None,
        }
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    pub fn emit(&self, event: Event) {
        self.emit_as(self.rank, event);
    }

    /// An event about another process (`launch` reporting a worker's exit).
    pub fn emit_as(&self, rank: Option<u64>, event: Event) {
        if self.on {
            write_line(&Line::new(rank, event));
        }
    }

    /// An event this crate defines beside the contract's (`bench`): `fields` is an object that
    /// gets the stream's `schema`, `event` and `rank`.
    pub fn emit_other(&self, event: &str, fields: &impl Serialize) {
        if !self.on {
            return;
        }
        #[derive(Serialize)]
        struct Other<'a, T> {
            schema: u32,
            #[serde(skip_serializing_if = "Option::is_none")]
            rank: Option<u64>,
            event: &'a str,
            #[serde(flatten)]
            fields: &'a T,
        }
        write_line(&Other {
            schema: SCHEMA,
            rank: self.rank,
            event,
            fields,
        });
    }
}

/// Writes one line; a failed write (a closed pipe) is dropped.
pub fn write_line(line: &impl Serialize) {
    let Ok(mut text) = serde_json::to_vec(line) else {
        return;
    };
    text.push(b'\n');
    write_raw(&text);
}

/// Writes bytes that already are one whole line.
pub fn write_raw(line: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line).and_then(|()| out.flush());
}
