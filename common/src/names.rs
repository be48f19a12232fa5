//! Names of every shared-memory segment and ZMQ endpoint, in one place so that no two services
//! can disagree. See docs/architecture.md for who binds and who connects.

use crate::DetectorConfig;

/// FrameBuffer of one module (owner: that module's `std-udp-recv`). Lives in /dev/shm.
pub fn module_buffer_name(detector: &str, module: u16) -> String {
    format!("std-daq.{detector}.module-{module}")
}

/// ImageBuffer of the assembled images (owner: `std-assembler`). Lives in /dev/shm.
pub fn image_buffer_name(detector: &str) -> String {
    format!("std-daq.{detector}.image")
}

/// Receivers PUSH `ModuleFrame`s here; the assembler binds the PULL end.
pub fn sync_endpoint(cfg: &DetectorConfig) -> String {
    format!("ipc://{}/std-daq-{}-sync", cfg.ipc_dir, cfg.detector_name)
}

/// The assembler binds a PUB here and publishes `ImageMetadata` (and empty heartbeats).
pub fn image_endpoint(cfg: &DetectorConfig) -> String {
    format!("ipc://{}/std-daq-{}-image", cfg.ipc_dir, cfg.detector_name)
}

/// The writer binds a REP here for JSON commands (start, stop, status).
pub fn writer_command_endpoint(cfg: &DetectorConfig) -> String {
    format!("ipc://{}/std-daq-{}-writer", cfg.ipc_dir, cfg.detector_name)
}

/// The command socket of writer `index` of several (`number_of_writers`): writer 0 at
/// [`writer_command_endpoint`], writer k > 0 at `...-writer-<k>`.
pub fn writer_command_endpoint_of(cfg: &DetectorConfig, index: u32) -> String {
    match index {
        0 => writer_command_endpoint(cfg),
        k => format!("{}-{k}", writer_command_endpoint(cfg)),
    }
}

/// The marker of writer `index` (as [`writer_command_endpoint_of`]: writer 0's is the one of a
/// single writer).
pub fn writer_marker_path_of(cfg: &DetectorConfig, index: u32) -> std::path::PathBuf {
    match index {
        0 => writer_marker_path(cfg),
        k => std::path::Path::new(&cfg.ipc_dir)
            .join(format!("std-daq-{}-writer-{k}.writing", cfg.detector_name)),
    }
}

/// The writer's marker naming the `.part` of its run in progress (removed when the run ends): a
/// restarted writer that finds it clears the HDF5 flags of the file its predecessor left.
pub fn writer_marker_path(cfg: &DetectorConfig) -> std::path::PathBuf {
    std::path::Path::new(&cfg.ipc_dir).join(format!("std-daq-{}-writer.writing", cfg.detector_name))
}

/// The file behind an `ipc://` endpoint, for clean-up checks.
pub fn ipc_path(endpoint: &str) -> Option<&str> {
    endpoint.strip_prefix("ipc://")
}

/// Removes the socket file a bound `ipc://` endpoint leaves behind; call after the socket closed.
/// libzmq does not always unlink it, and a stale file would mislead operators.
pub fn remove_ipc_file(endpoint: &str) {
    if let Some(path) = ipc_path(endpoint) {
        let _ = std::fs::remove_file(path);
    }
}

/// `std-stream-send` binds a PUB here and publishes, with status `LostInBuffer`, the ImageMetadata
/// of every image it could not replicate (once the receiver has confirmed the stream position).
pub fn stream_send_lost_endpoint(cfg: &DetectorConfig) -> String {
    format!(
        "ipc://{}/std-daq-{}-stream-send-lost",
        cfg.ipc_dir, cfg.detector_name
    )
}
