//! The writer agent's request handling, as `agent.rs` does it: `request::parse` on the message
//! body, then the policy. Nothing panics, and a request the policy accepts names a file that does
//! not exist yet, strictly inside the output root, even through symbolic links.
//!
//! Only `Policy::check` runs (it never touches the disk); `Policy::prepare` (which creates folders)
//! is never called. The output root is a fixed folder under the system temp dir, laid out once:
//!
//! ```text
//! $TMPDIR/std-daq-fuzz-write-request/
//!   root/            the output root: sub/ (folder), taken.h5 and plain (files),
//!                    escape -> ../outside, inner-link -> sub, dangling -> nowhere
//!   root-link -> root   the root as configured (so the lexical root differs from the real one)
//!   outside/         a folder outside the root
//! ```
//!
//! Input: byte 0 picks how the body is built, byte 1 the number of images, the rest is text:
//! 0 = the bytes are the body; 1 = `output_file` is `<resolved root>/<text>`; 2 = it is
//! `<configured root><text>`; 3 = it is the text alone (the JSON is built with serde_json).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use std_writer_agent::request::{self, Policy};

const MAX_IMAGES: u64 = 1000;

struct Setup {
    policy: Policy,
    given: PathBuf,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let base = std::env::temp_dir().join("std-daq-fuzz-write-request");
        let root = base.join("root");
        for dir in [root.join("sub"), base.join("outside")] {
            std::fs::create_dir_all(&dir).expect("creating the fuzz folders");
        }
        for file in ["taken.h5", "plain"] {
            std::fs::write(root.join(file), b"x").expect("creating the fuzz files");
        }
        for (target, link) in [
            (base.join("outside"), root.join("escape")),
            (root.join("sub"), root.join("inner-link")),
            (base.join("nowhere"), root.join("dangling")),
            (root.clone(), base.join("root-link")),
        ] {
            if link.symlink_metadata().is_err() {
                // Another fuzz process may create it at the same time: that is fine.
                let _ = std::os::unix::fs::symlink(&target, &link);
            }
        }
        let given = base.join("root-link");
        let policy = Policy::new(&given, MAX_IMAGES, false).expect("the fuzz output root");
        Setup { policy, given }
    })
}

/// The deepest part of `path` that exists, with every link resolved.
fn resolved_existing_prefix(path: &Path) -> PathBuf {
    let mut p = path;
    loop {
        if let Ok(real) = std::fs::canonicalize(p) {
            return real;
        }
        p = p
            .parent()
            .expect("the root exists, so some ancestor resolves");
    }
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    let root = s.policy.output_root();
    let [mode, n, rest @ ..] = data else { return };
    let body = if mode % 4 == 0 {
        rest.to_vec()
    } else {
        let text = String::from_utf8_lossy(rest);
        let output_file = match mode % 4 {
            1 => format!("{}/{text}", root.display()),
            2 => format!("{}{text}", s.given.display()),
            _ => text.into_owned(),
        };
        let mut v = serde_json::json!({"output_file": output_file, "n_images": n});
        if mode & 0x10 != 0 {
            v["user_id"] = serde_json::json!(mode);
            v["run_id"] = serde_json::json!("r1");
            v["sources"] = serde_json::json!(["jf"]);
            v["timestamp"] = serde_json::json!(1.5);
        }
        if mode & 0x20 != 0 {
            v["n_images"] = serde_json::json!(u64::from(*n) * 1000);
        }
        serde_json::to_vec(&v).expect("serialising a JSON value")
    };

    let Ok(req) = request::parse(&body) else {
        return;
    };
    let Ok(path) = s.policy.check(&req) else {
        return;
    };

    // Accepted: the number of images is allowed ...
    assert!(
        req.n_images.is_none_or(|n| (1..=MAX_IMAGES).contains(&n)),
        "{req:?}"
    );
    // ... the path is a new .h5 file strictly below the resolved root, with no `..` ...
    assert!(
        path.starts_with(root) && path != root,
        "{path:?} is not inside {root:?}"
    );
    assert!(
        !path.components().any(|c| c == Component::ParentDir),
        "{path:?} has '..'"
    );
    assert_eq!(
        path.extension().and_then(|e| e.to_str()),
        Some("h5"),
        "{path:?}"
    );
    assert!(path.symlink_metadata().is_err(), "{path:?} already exists");
    // ... and what exists of its folders resolves inside the root (no symlink escape).
    let real = resolved_existing_prefix(path.parent().expect("a file below the root"));
    assert!(
        real.starts_with(root),
        "{path:?} leaves the root through {real:?}"
    );
    // The request names the same file (under the resolved or the configured root).
    let named = Path::new(&req.output_file);
    assert!(
        named == path || named.strip_prefix(&s.given).ok() == path.strip_prefix(root).ok(),
        "{:?} was accepted as {path:?}",
        req.output_file
    );
});
