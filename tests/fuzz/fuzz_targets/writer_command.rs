//! The writer's command socket protocol (`h5_writer::command`): any bytes deserialise to a
//! `Command` (what the writer reads) or a `Reply` (what the agent and operators read) without
//! panicking, and a value that deserialises serialises back to JSON that deserialises to the same
//! value (so the writer and its clients agree on every message either can produce).
#![no_main]

use std_daq_common::writer_command::{Command, Reply, RunSummary};
use libfuzzer_sys::fuzz_target;

/// `seconds` is a float: serde_json's default float parsing may differ in the last bit after a
/// round trip, so compare everything else exactly.
fn without_seconds(mut r: Reply) -> Reply {
    let clear = |s: &mut Option<RunSummary>| {
        if let Some(s) = s {
            s.seconds = 0.0;
        }
    };
    clear(&mut r.run);
    if let Some(st) = &mut r.status {
        clear(&mut st.current);
        clear(&mut st.last_run);
    }
    r
}

fuzz_target!(|data: &[u8]| {
    if let Ok(cmd) = serde_json::from_slice::<Command>(data) {
        let json = serde_json::to_vec(&cmd).expect("a Command always serialises");
        let back: Command = serde_json::from_slice(&json).expect("a serialised Command parses");
        assert_eq!(back, cmd, "{}", String::from_utf8_lossy(&json));
    }
    if let Ok(reply) = serde_json::from_slice::<Reply>(data) {
        let json = serde_json::to_vec(&reply).expect("a Reply always serialises");
        let back: Reply = serde_json::from_slice(&json).expect("a serialised Reply parses");
        assert_eq!(
            without_seconds(back),
            without_seconds(reply),
            "{}",
            String::from_utf8_lossy(&json)
        );
    }
});
