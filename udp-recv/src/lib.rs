//! `std-udp-recv`: one process per detector module. It receives the module's UDP packets with
//! `recvmmsg`, assembles each frame in place in the module's FrameBuffer slot, and hands a
//! `ModuleFrame` to the assembler over ZMQ. Also home of `std-det-sim`, the detector simulator,
//! because it shares the packet formats.
//!
//! Never: trust a header field before checking it, leave bytes of an older frame where a packet
//! is missing, allocate or log per packet.

pub mod dark;
pub mod eiger;
pub mod format;
pub mod gigafrost;
pub mod jungfrau;
pub mod receiver;
pub mod sim;
pub mod socket;
