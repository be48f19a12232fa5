//! The whole receive loop on a real shared-memory ring, fed datagrams built from the fuzz input:
//! mostly well-formed JUNGFRAU packets with fuzzed frame and packet numbers, sizes and order,
//! plus raw garbage. Nothing may panic, and the counters must add up.
#![no_main]

use image_buffer::RingOwner;
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::time::Duration;
use std_daq_common::service::Shutdown;
use std_daq_common::status::StatusBoard;
use std_daq_common::ModuleFrame;
use udp_recv::jungfrau::{Jungfrau, FRAME_BYTES, HEADER_BYTES, PACKET_BYTES};
use udp_recv::receiver::{self, ReceiverSettings};
use udp_recv::socket::{PacketSource, Recv, ScatterBatch};

thread_local! {
    static RING: RefCell<RingOwner<ModuleFrame>> = RefCell::new(
        RingOwner::create(&format!("std-daq.fuzz-recv-{}", std::process::id()), 4, FRAME_BYTES as u64)
            .expect("creating the fuzz ring"),
    );
}

struct Source {
    datagrams: VecDeque<Vec<u8>>,
    batch: usize,
    timeouts_left: u8,
}

impl PacketSource for Source {
    fn recv_scatter(
        &mut self,
        batch: &mut ScatterBatch,
        header_len: usize,
        dest: &mut [u8],
        payload_len: usize,
    ) -> io::Result<Recv> {
        let n = self.batch.min(batch.capacity()).min(dest.len() / payload_len);
        let mut k = 0;
        while k < n {
            let Some(d) = self.datagrams.pop_front() else { break };
            batch.scatter(k, &d, header_len, &mut dest[k * payload_len..(k + 1) * payload_len]);
            k += 1;
        }
        batch.set_len(k);
        if k > 0 {
            Ok(Recv::Packets(k))
        } else if self.timeouts_left > 0 {
            self.timeouts_left -= 1;
            Ok(Recv::Timeout)
        } else {
            Ok(Recv::Closed)
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&batch, mut rest)) = data.split_first() else { return };
    let mut datagrams = VecDeque::new();
    // Records: [kind, frame, packet] -> a JUNGFRAU packet (kind even; kind bit 1 = wrong size),
    // or [kind, len, bytes...] -> raw bytes (kind odd).
    while rest.len() >= 3 && datagrams.len() < 512 {
        let (kind, a, b) = (rest[0], rest[1], rest[2]);
        rest = &rest[3..];
        if kind & 1 == 0 {
            let mut p = vec![0u8; if kind & 2 == 0 { PACKET_BYTES } else { PACKET_BYTES - 1 }];
            p[..8].copy_from_slice(&u64::from(a % 8 + 1).to_le_bytes());
            p[12..16].copy_from_slice(&u32::from(b).to_le_bytes());
            p[HEADER_BYTES] = kind;
            datagrams.push_back(p);
        } else {
            let len = usize::from(a).min(rest.len());
            datagrams.push_back(rest[..len].to_vec());
            rest = &rest[len..];
        }
    }
    let n = datagrams.len() as u64;
    let mut source = Source {
        datagrams,
        batch: usize::from(batch % 16) + 1,
        timeouts_left: 2,
    };
    let settings = ReceiverSettings {
        module_id: 0,
        udp_port: 0,
        frame_timeout: Duration::ZERO,
        stats_period: Duration::from_secs(3600),
        batch_size: usize::from(batch % 64) + 1,
    };
    let mut committed = 0u64;
    let stats = RING.with(|ring| {
        receiver::run(
            &Jungfrau,
            &settings,
            &mut source,
            &mut ring.borrow_mut(),
            &mut |_| {
                committed += 1;
                true
            },
            &StatusBoard::default(),
            &Shutdown::new(),
        )
        .expect("a receive loop over an in-memory source cannot fail")
    });
    assert_eq!(committed, stats.frames_complete + stats.frames_incomplete);
    assert_eq!(
        stats.packets + stats.malformed_packets + stats.duplicate_packets + stats.late_packets,
        n,
        "every datagram is accounted exactly once: {stats:?}"
    );
});
