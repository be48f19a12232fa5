//! Behaviour of the ring through its public API: header checks, lifecycle, commit semantics.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use image_buffer::{
    segment_path, Expect, ReadError, RingError, RingOwner, RingReader, MAX_IMAGE_ID,
};

/// Unique per test process, so parallel test runs on one machine do not collide.
fn unique_name(tag: &str) -> String {
    format!("ib-test.{}.{tag}", std::process::id())
}

/// Removes a file we planted in /dev/shm, even if the test fails.
struct Planted(PathBuf);

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Plants an unowned (unlocked) segment at `name`: a valid 4 x 1000-byte u64 ring, then `patch`ed.
fn plant_segment(name: &str, patch: impl FnOnce(&mut Vec<u8>)) -> Planted {
    let template =
        RingOwner::<u64>::create(&unique_name(&format!("{name}-template")), 4, 1000).unwrap();
    let mut bytes = fs::read(template.path()).unwrap();
    drop(template);
    patch(&mut bytes);
    let path = segment_path(name);
    fs::write(&path, bytes).unwrap();
    Planted(path)
}

fn attach_err<M: bytemuck::Pod>(name: &str, expect: Expect) -> RingError {
    RingReader::<M>::attach(name, expect).unwrap_err()
}

fn write_image(owner: &mut RingOwner<u64>, image_id: u64, fill: u8) {
    let mut writer = owner.begin_write(image_id).unwrap();
    writer.data_mut().fill(fill);
    *writer.meta_mut() = image_id;
    writer.commit();
}

// ---- header and geometry --------------------------------------------------------------------

#[test]
fn header_bytes_on_disk_are_the_documented_layout() {
    let owner = RingOwner::<u64>::create(&unique_name("golden"), 4, 1000).unwrap();
    let bytes = fs::read(owner.path()).unwrap();
    assert_eq!(bytes.len(), 8192 + 4 * 4096);
    #[rustfmt::skip]
    let expected: [u8; 64] = [
        b'S', b'T', b'D', b'D', b'A', b'Q', b'R', b'B', // magic
        1, 0, 0, 0,                                     // layout_version
        0x00, 0x10, 0, 0,                               // header_bytes = 4096
        4, 0, 0, 0, 0, 0, 0, 0,                         // n_slots
        0xe8, 0x03, 0, 0, 0, 0, 0, 0,                   // slot_bytes = 1000
        8, 0, 0, 0, 0, 0, 0, 0,                         // meta_bytes
        0x00, 0x10, 0, 0, 0, 0, 0, 0,                   // control_offset = 4096
        64, 0, 0, 0, 0, 0, 0, 0,                        // control_stride
        0x00, 0x20, 0, 0, 0, 0, 0, 0,                   // data_offset = 8192
    ];
    assert_eq!(bytes[..64], expected);
    assert_eq!(bytes[72..76], std::process::id().to_le_bytes()); // owner_pid
}

#[test]
fn wrong_expected_geometry_is_reported_with_both_values() {
    let name = unique_name("expect");
    let owner = RingOwner::<u64>::create(&name, 4, 1000).unwrap();
    let path = owner.path().display().to_string();

    let expect = Expect {
        n_slots: Some(8),
        ..Expect::default()
    };
    let err = attach_err::<u64>(&name, expect);
    assert!(matches!(
        err,
        RingError::HeaderMismatch {
            field: "n_slots",
            expected: 8,
            found: 4,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        format!("shared-memory segment {path}: n_slots: expected 8, found 4")
    );

    let expect = Expect {
        slot_bytes: Some(2000),
        ..Expect::default()
    };
    let err = attach_err::<u64>(&name, expect).to_string();
    assert_eq!(
        err,
        format!("shared-memory segment {path}: slot_bytes: expected 2000, found 1000")
    );

    let err = attach_err::<[u64; 2]>(&name, Expect::default()).to_string();
    assert_eq!(
        err,
        format!("shared-memory segment {path}: meta_bytes: expected 16, found 8")
    );

    let expect = Expect {
        n_slots: Some(4),
        slot_bytes: Some(1000),
    };
    RingReader::<u64>::attach(&name, expect).unwrap();
}

#[test]
fn malformed_files_are_reported_clearly() {
    let name = unique_name("bad-magic");
    let _planted = plant_segment(&name, |bytes| bytes[0] = b'X');
    let err = attach_err::<u64>(&name, Expect::default());
    assert!(matches!(err, RingError::BadMagic { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains(&segment_path(&name).display().to_string()),
        "{msg}"
    );
    assert!(
        msg.contains("expected 0x4252514144445453") && msg.contains("found 0x4252514144445458"),
        "{msg}"
    );

    let name = unique_name("bad-version");
    let _planted = plant_segment(&name, |bytes| bytes[8] = 7);
    let err = attach_err::<u64>(&name, Expect::default()).to_string();
    assert!(
        err.ends_with(&format!(
            "{}: layout_version: expected 1, found 7",
            segment_path(&name).display()
        )),
        "{err}"
    );

    let name = unique_name("short");
    let _planted = plant_segment(&name, |bytes| bytes.truncate(bytes.len() - 4096));
    let err = attach_err::<u64>(&name, Expect::default()).to_string();
    assert!(
        err.ends_with("file size: expected 24576, found 20480"),
        "{err}"
    );

    let name = unique_name("tiny");
    let _planted = plant_segment(&name, |bytes| bytes.truncate(100));
    let err = attach_err::<u64>(&name, Expect::default());
    assert!(
        matches!(
            err,
            RingError::Truncated {
                file_bytes: 100,
                ..
            }
        ),
        "{err}"
    );
    assert!(err
        .to_string()
        .contains(&segment_path(&name).display().to_string()));

    let name = unique_name("bad-stride");
    let _planted = plant_segment(&name, |bytes| bytes[48] = 128);
    let err = attach_err::<u64>(&name, Expect::default()).to_string();
    assert!(
        err.ends_with("control_stride: expected 64, found 128"),
        "{err}"
    );

    let name = unique_name("absurd");
    let _planted = plant_segment(&name, |bytes| {
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    let err = attach_err::<u64>(&name, Expect::default());
    assert!(
        matches!(
            err,
            RingError::InvalidGeometry {
                n_slots: u64::MAX,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn missing_segment_and_bad_names_are_clear_errors() {
    let name = unique_name("nobody-home");
    let err = attach_err::<u64>(&name, Expect::default());
    assert!(matches!(err, RingError::Missing { .. }));
    assert_eq!(
        err.to_string(),
        format!("shared-memory segment /dev/shm/{name} does not exist (is its owner running?)")
    );

    for bad in ["", "a/b", ".hidden", "with space"] {
        assert!(matches!(
            attach_err::<u64>(bad, Expect::default()),
            RingError::InvalidName { .. }
        ));
        assert!(matches!(
            RingOwner::<u64>::create(bad, 4, 1000).unwrap_err(),
            RingError::InvalidName { .. }
        ));
    }
}

#[test]
fn invalid_geometry_is_an_error_not_a_panic() {
    let name = unique_name("geometry");
    for (n_slots, slot_bytes) in [(0, 4096), (4, 0), (1 << 40, 1 << 30), (u64::MAX, u64::MAX)] {
        let err = RingOwner::<u64>::create(&name, n_slots, slot_bytes).unwrap_err();
        assert!(matches!(err, RingError::InvalidGeometry { .. }), "{err}");
        assert!(err.to_string().contains(&name));
    }
    assert!(!segment_path(&name).exists());
}

// ---- lifecycle ------------------------------------------------------------------------------

#[test]
fn readers_come_and_go_owner_removes_the_segment() {
    let name = unique_name("lifecycle");
    let mut owner = RingOwner::<u64>::create(&name, 4, 1000).unwrap();
    write_image(&mut owner, 3, 0xab);

    let reader = RingReader::<u64>::attach(&name, Expect::default()).unwrap();
    assert_eq!(reader.copy_out(3, &mut [0; 10]).unwrap(), 3);
    drop(reader);
    assert!(owner.path().exists());
    let reader = RingReader::<u64>::attach(&name, Expect::default()).unwrap();
    assert_eq!(
        (reader.name(), reader.n_slots(), reader.slot_bytes()),
        (name.as_str(), 4, 1000)
    );

    let path = owner.path().to_owned();
    assert!(!reader.is_replaced());
    drop(owner);
    assert!(!path.exists());
    assert!(reader.is_replaced(), "the owner went away");
    // An attached reader keeps its mapping of the (now unlinked) segment.
    let mut data = [0; 1000];
    assert_eq!(reader.copy_out(3, &mut data).unwrap(), 3);
    assert!(data.iter().all(|&b| b == 0xab));
    assert!(matches!(
        attach_err::<u64>(&name, Expect::default()),
        RingError::Missing { .. }
    ));
}

#[test]
fn second_owner_of_a_live_segment_is_refused() {
    let name = unique_name("in-use");
    let first = RingOwner::<u64>::create(&name, 4, 1000).unwrap();
    let err = RingOwner::<u64>::create(&name, 4, 1000).unwrap_err();
    let pid = std::process::id();
    assert!(
        matches!(err, RingError::InUse { pid: Some(p), .. } if p == pid),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "shared-memory segment {} is in use by its live owner (pid {pid})",
            first.path().display()
        )
    );
    // The failed attempt left the first owner's segment alone.
    RingReader::<u64>::attach(&name, Expect::default()).unwrap();
    assert!(!leftover_temp_files(&name));
}

#[test]
fn stale_segments_are_refused_by_readers_and_replaced_by_owners() {
    let name = unique_name("stale-valid");
    let planted = plant_segment(&name, |_| {});
    let err = attach_err::<u64>(&name, Expect::default());
    assert!(
        matches!(err, RingError::Stale { pid: Some(_), .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&planted.0.display().to_string()));

    let mut owner = RingOwner::<u64>::create(&name, 2, 64).unwrap();
    write_image(&mut owner, 1, 1);
    let reader = RingReader::<u64>::attach(&name, Expect::default()).unwrap();
    assert_eq!((reader.n_slots(), reader.slot_bytes()), (2, 64));
    assert_eq!(reader.copy_out(1, &mut []).unwrap(), 1);

    let name = unique_name("stale-garbage");
    let planted = Planted(segment_path(&name));
    fs::write(&planted.0, b"not a ring at all").unwrap();
    let owner = RingOwner::<u64>::create(&name, 2, 64).unwrap();
    RingReader::<u64>::attach(&name, Expect::default()).unwrap();
    drop(owner);
    assert!(!planted.0.exists());
    assert!(!leftover_temp_files(&name));
}

#[test]
fn owner_never_removes_a_successors_segment() {
    let name = unique_name("successor");
    let owner = RingOwner::<u64>::create(&name, 2, 64).unwrap();
    let successor = Planted(segment_path(&name));
    let other = segment_path(&unique_name("successor-other"));
    fs::write(&other, b"someone else's").unwrap();
    fs::rename(&other, &successor.0).unwrap();
    drop(owner);
    assert_eq!(fs::read(&successor.0).unwrap(), b"someone else's");
}

#[test]
fn attach_wait_waits_times_out_and_cancels() {
    let name = unique_name("wait");
    let err =
        RingReader::<u64>::attach_wait(&name, Expect::default(), Duration::from_millis(30), || {
            false
        })
        .unwrap_err();
    assert!(
        matches!(&err, RingError::Timeout { last, .. } if matches!(**last, RingError::Missing { .. }))
    );
    assert!(err.to_string().contains("does not exist"), "{err}");

    let err =
        RingReader::<u64>::attach_wait(&name, Expect::default(), Duration::from_secs(60), || true)
            .unwrap_err();
    assert!(matches!(err, RingError::Cancelled { .. }), "{err}");

    let (release_owner, owner_done) = mpsc::channel::<()>();
    let owner_name = name.clone();
    let owner_thread = thread::spawn(move || {
        let owner = RingOwner::<u64>::create(&owner_name, 4, 1000).unwrap();
        owner_done.recv().unwrap();
        drop(owner);
    });
    let reader =
        RingReader::<u64>::attach_wait(&name, Expect::default(), Duration::from_secs(60), || false)
            .unwrap();
    assert_eq!(reader.n_slots(), 4);
    release_owner.send(()).unwrap();
    owner_thread.join().unwrap();
}

fn leftover_temp_files(name: &str) -> bool {
    fs::read_dir("/dev/shm").unwrap().any(|entry| {
        entry
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(&format!(".{name}."))
    })
}

// ---- commit semantics -----------------------------------------------------------------------

#[test]
fn committed_images_read_back_and_are_overwritten_by_later_laps() {
    let name = unique_name("commit");
    let mut owner = RingOwner::<u64>::create(&name, 4, 1000).unwrap();
    let reader = RingReader::<u64>::attach(&name, Expect::default()).unwrap();

    assert_eq!(reader.check(0), Err(ReadError::NotPresent));
    write_image(&mut owner, 5, 0x55);
    assert_eq!(reader.check(5), Ok(()));
    let (meta, sum) = reader
        .read(5, |meta, data| {
            (*meta, data.iter().map(|&b| u64::from(b)).sum::<u64>())
        })
        .unwrap();
    assert_eq!((meta, sum), (5, 0x55 * 1000));

    // Same slot, other ids: not yet written (1) or never written (9 is ahead of 5).
    assert_eq!(
        reader.check(1),
        Err(ReadError::Overwritten { found_image_id: 5 })
    );
    assert_eq!(
        reader.check(9),
        Err(ReadError::Overwritten { found_image_id: 5 })
    );
    assert_eq!(reader.check(2), Err(ReadError::NotPresent));

    write_image(&mut owner, 9, 0x99);
    assert_eq!(
        reader.read(5, |_, _| ()),
        Err(ReadError::Overwritten { found_image_id: 9 })
    );
    let mut data = vec![0; 1000];
    assert_eq!(reader.copy_out(9, &mut data), Ok(9));
    assert!(data.iter().all(|&b| b == 0x99));

    assert_eq!(
        reader.check(MAX_IMAGE_ID + 1),
        Err(ReadError::InvalidImageId)
    );
    assert_eq!(
        reader.read(u64::MAX, |_, _| ()),
        Err(ReadError::InvalidImageId)
    );
    let err = owner.begin_write(MAX_IMAGE_ID + 1).unwrap_err();
    assert!(matches!(err, RingError::ImageIdTooLarge { .. }), "{err}");
    // MAX_IMAGE_ID itself is a valid id.
    write_image(&mut owner, MAX_IMAGE_ID, 1);
    assert_eq!(reader.check(MAX_IMAGE_ID), Ok(()));
}

#[test]
fn uncommitted_writes_are_never_visible() {
    let name = unique_name("uncommitted");
    let mut owner = RingOwner::<u64>::create(&name, 4, 1000).unwrap();
    let reader = RingReader::<u64>::attach(&name, Expect::default()).unwrap();

    write_image(&mut owner, 2, 2);
    let mut writer = owner.begin_write(6).unwrap();
    assert_eq!(writer.image_id(), 6);
    assert_eq!(writer.data_mut().len(), 1000);
    writer.data_mut().fill(6);
    assert_eq!(reader.check(6), Err(ReadError::NotPresent));
    assert_eq!(
        reader.check(2),
        Err(ReadError::Overwritten { found_image_id: 6 })
    );
    drop(writer);
    assert_eq!(reader.check(6), Err(ReadError::NotPresent));
    assert_eq!(reader.check(2), Err(ReadError::NotPresent));
}

#[test]
fn changes_during_a_read_invalidate_it() {
    let name = unique_name("during-read");
    let mut owner = RingOwner::<u64>::create(&name, 4, 1000).unwrap();
    let reader = RingReader::<u64>::attach(&name, Expect::default()).unwrap();
    write_image(&mut owner, 1, 1);

    // Lapped while reading: reported as overwritten by the newer image.
    let result = reader.read(1, |_, _| owner.begin_write(5).unwrap().commit());
    assert_eq!(result, Err(ReadError::Overwritten { found_image_id: 5 }));

    // Same id being rewritten, or an abandoned write emptying the slot: torn.
    write_image(&mut owner, 1, 1);
    let result = reader.read(1, |_, _| std::mem::forget(owner.begin_write(1).unwrap()));
    assert_eq!(result, Err(ReadError::Torn));
    write_image(&mut owner, 1, 1);
    let result = reader.read(1, |_, _| drop(owner.begin_write(1).unwrap()));
    assert_eq!(result, Err(ReadError::Torn));

    // What f sees is the live mapping: the writer's bytes show up during the read.
    write_image(&mut owner, 1, 1);
    let result = reader.read(1, |_, data| {
        owner.begin_write(1).unwrap().data_mut()[0] = 0xee;
        data[0]
    });
    assert_eq!(result, Err(ReadError::Torn));
}

#[test]
#[should_panic(expected = "longer than the 1000-byte slots")]
fn copy_out_into_an_oversized_buffer_panics() {
    let name = unique_name("oversized");
    let mut owner = RingOwner::<u64>::create(&name, 4, 1000).unwrap();
    write_image(&mut owner, 0, 0);
    let reader = RingReader::<u64>::attach(&name, Expect::default()).unwrap();
    let _ = reader.copy_out(0, &mut [0; 1001]);
}

#[test]
fn handles_are_send_and_debug() {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    send::<RingOwner<u64>>();
    send::<RingReader<u64>>();
    sync::<RingReader<u64>>();
    send::<image_buffer::SlotWriter<'static, u64>>();

    let owner = RingOwner::<u64>::create(&unique_name("debug"), 2, 64).unwrap();
    let debug = format!("{owner:?}");
    assert!(
        debug.contains("RingOwner") && debug.contains("n_slots: 2"),
        "{debug}"
    );
}

#[test]
fn a_restarted_owner_is_noticed_and_can_be_attached_again() {
    let name = unique_name("restart");
    let mut first = RingOwner::<u64>::create(&name, 4, 1000).unwrap();
    write_image(&mut first, 1, 0x11);
    let reader = RingReader::<u64>::attach(&name, Expect::default()).unwrap();
    drop(first);
    let mut second = RingOwner::<u64>::create(&name, 4, 1000).unwrap();
    write_image(&mut second, 2, 0x22);
    assert!(reader.is_replaced(), "a new segment stands at the name");
    // The old mapping knows nothing of the new owner's images; a new reader does.
    assert!(reader.copy_out(2, &mut [0; 10]).is_err());
    let again = RingReader::<u64>::attach(&name, Expect::default()).unwrap();
    assert!(!again.is_replaced());
    assert_eq!(again.copy_out(2, &mut [0; 10]).unwrap(), 2);
}
