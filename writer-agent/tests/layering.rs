//! The agent speaks to the writer through `std_daq_common::writer_command` (messages) and its own
//! `writer_client` (ZMQ): the `std-writer-agent` binary links no libhdf5.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn the_agent_binary_does_not_link_libhdf5() {
    let exe = env!("CARGO_BIN_EXE_std-writer-agent");
    let out = Command::new("ldd").arg(exe).output().unwrap();
    assert!(out.status.success(), "ldd {exe} failed");
    let libs = String::from_utf8_lossy(&out.stdout);
    assert!(libs.contains("libc.so"), "ldd output unexpected: {libs}");
    assert!(
        !libs.contains("libhdf5"),
        "the agent links libhdf5:\n{libs}"
    );
}
