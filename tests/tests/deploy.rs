//! Deployment files (issue 6): the systemd unit templates in deploy/systemd/ and the container
//! files in docker/, checked statically.
//!
//! - every unit, instantiated (`std-udp-recv@jf-0.service`, `std-assembler@jf.service`, ...) with
//!   the drop-ins `add-detector.sh` writes, passes `systemd-analyze verify` (offline, in a
//!   private unit path with stub system targets) with no output at all, and a deliberately
//!   broken unit does not;
//! - every `std-*` unit a unit names exists as a template, and the settings the deployment
//!   relies on (restart policy, SIGTERM, stop timeout, memlock, shared /tmp, the stop order of
//!   the clean drain) are there;
//! - the receiver's instance-name parsing (`<detector>-<module>`) and `add-detector.sh`;
//! - the container entrypoint's contract (service from the command or STD_DAQ_SERVICE, mounted
//!   config or Redis), the compose file (parsed with Python's yaml) and the Dockerfile
//!   (hadolint when it is installed).
//!
//! `scripts/setup.sh` installs every tool these checks use (systemd-analyze, python3 with yaml,
//! shellcheck; hadolint, pinned, in the project's virtual environment `.venv`). Outside CI a
//! missing tool makes its part skip with a printed reason; in CI (`CI=true`) it is a failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std_daq::pipeline::default_bin_dir;
use std_daq_common::config::DetectorConfig;

const TEMPLATES: [&str; 8] = [
    "std-assembler@.service",
    "std-daq@.target",
    "std-h5-writer-k@.service",
    "std-h5-writer@.service",
    "std-stream-recv@.service",
    "std-stream-send@.service",
    "std-udp-recv@.service",
    "std-writer-agent@.service",
];

/// System units the templates refer to, as empty stubs, so verification does not depend on what
/// the host has installed.
const STUB_TARGETS: [&str; 7] = [
    "sysinit.target",
    "basic.target",
    "shutdown.target",
    "network-online.target",
    "multi-user.target",
    "local-fs.target",
    "remote-fs.target",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn units_dir() -> PathBuf {
    repo().join("deploy/systemd")
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std_daq_tests::work_dir(&format!("deploy-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The executable `name` on PATH (or at an absolute path), if any.
fn tool(name: &str) -> Option<PathBuf> {
    if name.starts_with('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn skip(what: &str, reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what}: {reason}; in CI every prerequisite must be there (run scripts/setup.sh)");
    }
    eprintln!("SKIPPED {what}: {reason}");
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn write_exe(path: &Path, body: &str) {
    std::fs::write(path, body).unwrap();
    let status = Command::new("chmod")
        .arg("0755")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Joins systemd's continuation lines (a trailing backslash becomes a space).
fn unit_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if let Some(head) = line.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
        } else {
            cur.push_str(line);
            lines.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// Every value of `key` in a unit file (comments skipped).
fn values(text: &str, key: &str) -> Vec<String> {
    unit_lines(text)
        .iter()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
        .collect()
}

fn read_unit(name: &str) -> String {
    std::fs::read_to_string(units_dir().join(name)).unwrap()
}

/// Copies the templates into `dir` with ExecStart binaries pointing at `bin_dir`, adds the stub
/// system targets and runs add-detector.sh for detector `jf` (2 modules, CPUs 2 and 3).
fn install_units(dir: &Path, bin_dir: &Path) {
    for t in TEMPLATES {
        let text = read_unit(t).replace("/usr/local/bin/", &format!("{}/", bin_dir.display()));
        std::fs::write(dir.join(t), text).unwrap();
    }
    for t in STUB_TARGETS {
        std::fs::write(dir.join(t), format!("[Unit]\nDescription=stub {t}\n")).unwrap();
    }
    let out = Command::new("sh")
        .arg(units_dir().join("add-detector.sh"))
        .args(["jf", "2", "2", "3"])
        .env("UNIT_DIR", dir)
        .env("WRITERS", "2")
        .output()
        .unwrap();
    assert!(out.status.success(), "add-detector.sh: {}", text(&out));
}

/// `systemd-analyze verify` of `units` with `dir` as the only unit path: Ok when it exits 0 and
/// prints nothing (warnings such as an unknown key or an unparsable value exit 0 but print).
fn verify(analyze: &Path, dir: &Path, units: &[String]) -> Result<(), String> {
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .args(units)
        .current_dir(dir)
        .env("SYSTEMD_UNIT_PATH", dir)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .map_err(|e| format!("running systemd-analyze: {e}"))?;
    let printed = text(&out);
    if out.status.success() && printed.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("exit {:?}:\n{printed}", out.status.code()))
    }
}

fn instances() -> Vec<String> {
    vec![
        "std-udp-recv@jf-0.service".into(),
        "std-udp-recv@jf-1.service".into(),
        // no drop-in, detector name with dashes
        "std-udp-recv@my-det-12.service".into(),
        "std-assembler@jf.service".into(),
        "std-h5-writer@jf.service".into(),
        "std-h5-writer-k@jf-1.service".into(),
        "std-writer-agent@jf.service".into(),
        "std-stream-send@jf.service".into(),
        "std-stream-recv@jf.service".into(),
        "std-daq@jf.target".into(),
    ]
}

#[test]
fn the_unit_templates_are_all_there() {
    let mut found: Vec<String> = std::fs::read_dir(units_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service") || n.ends_with(".target"))
        .collect();
    found.sort();
    assert_eq!(found, TEMPLATES.to_vec());
}

#[test]
fn every_unit_passes_systemd_analyze_verify_and_a_broken_one_does_not() {
    let Some(analyze) = tool("systemd-analyze").or_else(|| tool("/usr/bin/systemd-analyze")) else {
        return skip("systemd-analyze verify", "systemd-analyze is not installed");
    };
    let bin_dir = default_bin_dir().unwrap();
    let dir = scratch("verify");
    install_units(&dir, &bin_dir);
    if let Err(e) = verify(&analyze, &dir, &instances()) {
        panic!(
            "systemd-analyze verify of the units in {}: {e}",
            dir.display()
        );
    }

    // The check itself catches what a broken unit looks like: a warning (exit 0), a missing
    // binary, a bad specifier.
    let orig = std::fs::read_to_string(dir.join("std-assembler@.service")).unwrap();
    for (from, to) in [
        ("Restart=on-failure", "Restart=sometimes"),
        ("KillSignal=SIGTERM", "KillSignal=SIGFOO"),
        ("LimitMEMLOCK=", "LimitMEMLOK="),
        ("/std-assembler --config", "/std-assemblr --config"),
        ("/etc/std-daq/%i.json\n", "/etc/std-daq/%Q.json\n"),
    ] {
        assert!(orig.contains(from), "{from}");
        std::fs::write(dir.join("std-assembler@.service"), orig.replace(from, to)).unwrap();
        let res = verify(&analyze, &dir, &["std-assembler@jf.service".into()]);
        assert!(res.is_err(), "{from} -> {to} went unnoticed");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn units_name_only_existing_std_daq_units_and_carry_the_deployment_settings() {
    let dir = scratch("settings");
    install_units(&dir, Path::new("/usr/local/bin"));
    let mut files: Vec<PathBuf> = TEMPLATES.iter().map(|t| dir.join(t)).collect();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    // Dependencies on std-daq units: each must be an instance of one of the templates.
    let templates: BTreeSet<&str> = TEMPLATES.into_iter().collect();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for key in [
            "Wants",
            "Requires",
            "BindsTo",
            "PartOf",
            "After",
            "Before",
            "Conflicts",
            "WantedBy",
        ] {
            for value in values(&text, key) {
                for unit in value.split_whitespace().filter(|u| u.starts_with("std-")) {
                    let unit = unit.replace("%i", "jf");
                    let (prefix, rest) = unit.split_once('@').unwrap_or((&unit, ""));
                    let suffix = rest.rsplit_once('.').map(|(_, s)| s).unwrap_or("");
                    let template = format!("{prefix}@.{suffix}");
                    assert!(
                        templates.contains(template.as_str()),
                        "{}: {key}={unit} names no unit template",
                        file.display()
                    );
                }
            }
        }
    }

    for t in TEMPLATES.iter().filter(|t| t.ends_with(".service")) {
        let text = read_unit(t);
        let one = |key: &str| {
            let v = values(&text, key);
            assert_eq!(v.len(), 1, "{t}: {key}= {v:?}");
            v[0].clone()
        };
        assert_eq!(one("Restart"), "on-failure", "{t}");
        assert!(!one("RestartSec").is_empty(), "{t}");
        assert_eq!(one("KillSignal"), "SIGTERM", "{t}");
        assert!(!one("TimeoutStopSec").is_empty(), "{t}");
        assert_eq!(one("LimitMEMLOCK"), "infinity", "{t}");
        assert_eq!(one("PrivateTmp"), "no", "{t}: ipc_dir /tmp must be shared");
        assert_eq!(one("PrivateDevices"), "no", "{t}: /dev/shm must be shared");
        let exec = one("ExecStart");
        assert!(exec.contains("/usr/local/bin/std-"), "{t}: {exec}");
        assert!(
            exec.contains("--config") && exec.contains("/etc/std-daq/"),
            "{t}"
        );
        // Instances <detector>-<n>: config and target membership come from the script and drop-in.
        if !["std-udp-recv@.service", "std-h5-writer-k@.service"].contains(t) {
            assert!(exec.contains("/etc/std-daq/%i.json"), "{t}: {exec}");
            assert_eq!(one("PartOf"), "std-daq@%i.target", "{t}");
        }
    }

    // Stop order = reverse start order: receivers, then assembler, then writer; the agent stops
    // before the writer (and before a local broker).
    let after = |t: &str| values(&read_unit(t), "After").join(" ");
    assert!(after("std-assembler@.service").contains("std-h5-writer@%i.service"));
    assert!(after("std-assembler@.service").contains("std-stream-send@%i.service"));
    assert!(after("std-writer-agent@.service").contains("std-h5-writer@%i.service"));
    assert!(after("std-writer-agent@.service").contains("rabbitmq-server.service"));
    assert!(after("std-stream-recv@.service").contains("std-h5-writer@%i.service"));
    let dropin =
        std::fs::read_to_string(dir.join("std-udp-recv@jf-1.service.d/std-daq.conf")).unwrap();
    assert_eq!(values(&dropin, "After"), ["std-assembler@jf.service"]);
    assert_eq!(values(&dropin, "PartOf"), ["std-daq@jf.target"]);
    assert_eq!(values(&dropin, "Environment"), ["STD_DAQ_RECV_CPU=3"]);
    let target = std::fs::read_to_string(dir.join("std-daq@jf.target.d/receivers.conf")).unwrap();
    assert_eq!(
        values(&target, "Wants"),
        ["std-udp-recv@jf-0.service std-udp-recv@jf-1.service"]
    );
    // WRITERS=2: writer 1 joins the target and stops after the assembler, like writer 0.
    let writers = std::fs::read_to_string(dir.join("std-daq@jf.target.d/writers.conf")).unwrap();
    assert_eq!(values(&writers, "Wants"), ["std-h5-writer-k@jf-1.service"]);
    let dropin =
        std::fs::read_to_string(dir.join("std-h5-writer-k@jf-1.service.d/std-daq.conf")).unwrap();
    assert_eq!(values(&dropin, "PartOf"), ["std-daq@jf.target"]);
    assert_eq!(values(&dropin, "Before"), ["std-assembler@jf.service"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writer k > 0 (`std-h5-writer-k@<detector>-<k>`): the config and `--writer-index` come from
/// the instance name, a bad one exits 2.
#[test]
fn the_extra_writer_unit_parses_detector_and_index_from_its_instance_name() {
    let dir = scratch("writer-instance");
    let stub = dir.join("std-h5-writer");
    write_exe(&stub, "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n");
    let exec = values(&read_unit("std-h5-writer-k@.service"), "ExecStart").remove(0);
    let body = exec
        .strip_prefix("/bin/sh -c '")
        .expect("ExecStart=/bin/sh -c '...'");
    let (script, rest) = body.rsplit_once('\'').unwrap();
    assert_eq!(rest.trim(), "std-h5-writer %i");
    let script = script
        .replace("$$", "$")
        .replace("%%", "%")
        .replace("/usr/local/bin/std-h5-writer", &stub.display().to_string());
    let run = |instance: &str| {
        Command::new("sh")
            .args(["-c", &script, "std-h5-writer", instance])
            .output()
            .unwrap()
    };
    let out = run("my-det-3");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "--config\n/etc/std-daq/my-det.json\n--writer-index\n3\n"
    );
    for bad in ["jf", "jf-", "jf-x"] {
        let out = run(bad);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out));
        assert!(out.stdout.is_empty(), "{bad}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_receiver_unit_parses_detector_and_module_from_its_instance_name() {
    let dir = scratch("instance");
    let stub = dir.join("std-udp-recv");
    write_exe(&stub, "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n");

    let exec = values(&read_unit("std-udp-recv@.service"), "ExecStart").remove(0);
    let body = exec
        .strip_prefix("/bin/sh -c '")
        .expect("ExecStart=/bin/sh -c '...'");
    let (script, rest) = body.rsplit_once('\'').unwrap();
    assert_eq!(rest.trim(), "std-udp-recv %i");
    // What systemd hands to sh: $$ -> $, %% -> %.
    assert!(!script.replace("%%", "").contains('%'), "{script}");
    let script = script
        .replace("$$", "$")
        .replace("%%", "%")
        .replace("/usr/local/bin/std-udp-recv", &stub.display().to_string());

    let run = |instance: &str, cpu: &str| {
        Command::new("sh")
            .args(["-c", &script, "std-udp-recv", instance])
            .env("STD_DAQ_RECV_CPU", cpu)
            .output()
            .unwrap()
    };
    let args = |out: Output| {
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        args(run("jf-0", "")),
        "--config\n/etc/std-daq/jf.json\n--module\n0\n"
    );
    assert_eq!(
        args(run("my-det-12", "7")),
        "--config\n/etc/std-daq/my-det.json\n--module\n12\n--cpu\n7\n"
    );
    for bad in ["jf", "jf-", "-0", "jf-x", "jf-1a"] {
        let out = run(bad, "");
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out));
        assert!(out.stdout.is_empty(), "{bad}");
    }

    // add-detector.sh refuses what it cannot turn into unit names.
    let add = units_dir().join("add-detector.sh");
    for args in [
        &["jf", "2", "1"][..],
        &["jf", "0"],
        &["jf/x", "1"],
        &["jf"],
        &["jf", "1", "x"],
    ] {
        let out = Command::new("sh")
            .arg(&add)
            .args(args)
            .env("UNIT_DIR", dir.join("units"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    }
    assert!(!dir.join("units").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shell_scripts_are_valid() {
    let scripts = [
        repo().join("docker/entrypoint.sh"),
        units_dir().join("add-detector.sh"),
    ];
    for script in &scripts {
        for shell in ["sh", "bash"] {
            let out = Command::new(shell).arg("-n").arg(script).output().unwrap();
            assert!(
                out.status.success(),
                "{shell} -n {}: {}",
                script.display(),
                text(&out)
            );
        }
    }
    match tool("shellcheck") {
        Some(sc) => {
            let out = Command::new(sc).args(&scripts).output().unwrap();
            assert!(out.status.success(), "shellcheck: {}", text(&out));
        }
        None => skip("shellcheck", "shellcheck is not installed"),
    }
}

#[test]
fn the_entrypoint_follows_the_container_contract() {
    let dir = scratch("entrypoint");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in [
        "std-udp-recv",
        "std-assembler",
        "std-h5-writer",
        "std-writer-agent",
    ] {
        write_exe(
            &bin.join(name),
            "#!/bin/sh\nbasename \"$0\"\nfor a in \"$@\"; do echo \"$a\"; done\n",
        );
    }
    // A fake redis-cli: config.agent1 holds a config, any other key is missing (empty line).
    write_exe(
        &bin.join("redis-cli"),
        "#!/bin/sh\nfor a; do last=$a; done\n\
         if [ \"$last\" = config.agent1 ]; then echo '{\"detector_name\":\"d\"}'; else echo; fi\n",
    );
    let config = dir.join("config.json");
    std::fs::write(&config, "{}").unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let entry = repo().join("docker/entrypoint.sh");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new("sh");
        cmd.arg(&entry)
            .args(args)
            .env_clear()
            .env("PATH", &path)
            .env("TMPDIR", &dir)
            .env("STD_DAQ_BIN_DIR", &bin);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let ok = |out: Output| {
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let cfg = config.display().to_string();
    let missing = dir.join("missing.json").display().to_string();

    // Service as the command, mounted config.
    assert_eq!(
        ok(run(
            &["std-udp-recv", "--module", "0"],
            &[("STD_DAQ_CONFIG", &cfg)]
        )),
        format!("std-udp-recv\n--config\n{cfg}\n--module\n0\n")
    );
    // Service from STD_DAQ_SERVICE (short form), no config file: the binary reads Redis itself.
    assert_eq!(
        ok(run(
            &[],
            &[
                ("STD_DAQ_SERVICE", "assembler"),
                ("STD_DAQ_CONFIG", &missing),
                ("SERVICE_NAME", "s1")
            ]
        )),
        "std-assembler\n"
    );
    // An explicit --config wins over the mounted one.
    assert_eq!(
        ok(run(
            &["h5-writer", "--config", "/x.json", "--compression", "none"],
            &[("STD_DAQ_CONFIG", &cfg)]
        )),
        "std-h5-writer\n--config\n/x.json\n--compression\nnone\n"
    );
    // The agent only takes a file: fetched from Redis config.<SERVICE_NAME>.
    let fetched = dir.join("std-daq-config.agent1.json");
    assert_eq!(
        ok(run(
            &["std-writer-agent"],
            &[("STD_DAQ_CONFIG", &missing), ("SERVICE_NAME", "agent1")]
        )),
        format!("std-writer-agent\n--config\n{}\n", fetched.display())
    );
    assert_eq!(
        std::fs::read_to_string(&fetched).unwrap().trim(),
        r#"{"detector_name":"d"}"#
    );
    // Failures: key missing in Redis; no config and no SERVICE_NAME; no or unknown service.
    let code = |out: Output| out.status.code();
    let agent2 = [
        ("STD_DAQ_CONFIG", missing.as_str()),
        ("SERVICE_NAME", "agent2"),
    ];
    assert_eq!(code(run(&["writer-agent"], &agent2)), Some(1));
    assert_eq!(
        code(run(&["udp-recv"], &[("STD_DAQ_CONFIG", &missing)])),
        Some(2)
    );
    assert_eq!(code(run(&[], &[("STD_DAQ_CONFIG", &cfg)])), Some(2));
    assert_eq!(code(run(&[], &[("STD_DAQ_SERVICE", "nonsense")])), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_compose_file_describes_the_full_local_stack() {
    let docker = repo().join("docker");
    DetectorConfig::from_file(&docker.join("config.example.json")).unwrap();
    let python = std_daq_tests::python();
    let has_yaml = Command::new(python)
        .args(["-c", "import yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_yaml {
        return skip(
            "docker-compose.yml",
            "python3 with the yaml module is not installed",
        );
    }
    let out = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(docker.join("docker-compose.yml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "yaml: {}", text(&out));
    let compose: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let services = compose["services"].as_object().unwrap();

    let bin_dir = default_bin_dir().unwrap();
    let mut receivers = Vec::new();
    let mut binaries = BTreeSet::new();
    for (name, svc) in services {
        if name == "rabbitmq" || name == "redis" {
            assert_eq!(svc["network_mode"], "host", "{name}");
            continue;
        }
        let cmd: Vec<&str> = svc["command"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: command"))
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            bin_dir.join(cmd[0]).is_file(),
            "{name}: no binary {}",
            cmd[0]
        );
        binaries.insert(cmd[0]);
        if cmd[0] == "std-udp-recv" {
            receivers.push(cmd[1..].join(" "));
        }
        assert_eq!(svc["network_mode"], "host", "{name}");
        assert_eq!(svc["ipc"], "host", "{name}: /dev/shm must be shared");
        let build = &svc["build"];
        let context = docker.join(build["context"].as_str().unwrap());
        assert!(context
            .join(build["dockerfile"].as_str().unwrap())
            .is_file());
        let volumes: Vec<&str> = svc["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(volumes
            .iter()
            .any(|v| v.ends_with(":/std_daq_service/config.json:ro")));
        assert!(
            volumes.contains(&"std-daq-ipc:/tmp"),
            "{name}: ipc_dir /tmp shared"
        );
        if ["std-h5-writer", "std-writer-agent"].contains(&cmd[0]) {
            assert!(
                volumes.iter().any(|v| v.ends_with(":/data")),
                "{name}: /data"
            );
        }
    }
    receivers.sort();
    assert_eq!(receivers, ["--module 0", "--module 1"]);
    assert_eq!(
        binaries.into_iter().collect::<Vec<_>>(),
        [
            "std-assembler",
            "std-h5-writer",
            "std-udp-recv",
            "std-writer-agent"
        ]
    );
    assert!(services.contains_key("rabbitmq") && services.contains_key("redis"));
    // Clean drain on `down`: receivers stop before the assembler, the assembler before the writer.
    assert_eq!(services["udp-recv-0"]["depends_on"][0], "assembler");
    assert_eq!(services["assembler"]["depends_on"][0], "writer");
    assert!(compose["volumes"]
        .as_object()
        .unwrap()
        .contains_key("std-daq-ipc"));
}

#[test]
fn the_dockerfile_builds_every_binary_on_bookworm() {
    let path = repo().join("docker/Dockerfile");
    let dockerfile = std::fs::read_to_string(&path).unwrap();
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].contains("bookworm") && froms[0].contains(" AS builder"));
    assert!(froms[1].contains("bookworm-slim"));
    for needle in [
        "libhdf5-dev",
        "cargo build --release --workspace --bins",
        "libhdf5-103-1",
        "bitshuffle",
        "COPY docker/entrypoint.sh",
        "ENTRYPOINT",
    ] {
        assert!(dockerfile.contains(needle), "Dockerfile lacks {needle}");
    }
    let venv_hadolint = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/hadolint");
    match tool("hadolint").or_else(|| venv_hadolint.is_file().then_some(venv_hadolint)) {
        Some(h) => {
            let out = Command::new(h)
                .args(["--no-color"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(out.status.success(), "hadolint: {}", text(&out));
        }
        None => skip(
            "hadolint",
            "hadolint is not installed (scripts/setup.sh puts it in .venv)",
        ),
    }
}

/// Issue 18 items 5 and 7: the shipped example configs turn metrics on and name the compression;
/// no unit and no compose service passes `--compression` or `--metrics-addr` (the config carries
/// them, so every way of starting the services uses the same settings).
#[test]
fn the_shipped_configs_carry_compression_and_metrics_and_nothing_overrides_them() {
    use std_daq_common::{ImageCompression, MetricsService};
    for example in [
        repo().join("docker/config.example.json"),
        units_dir().join("detector.json.example"),
    ] {
        let cfg = DetectorConfig::from_file(&example).unwrap();
        assert!(
            cfg.notices.is_empty(),
            "{}: {:?}",
            example.display(),
            cfg.notices
        );
        assert_eq!(
            cfg.compression,
            ImageCompression::None,
            "{}",
            example.display()
        );
        assert_eq!(
            cfg.metrics_addr(MetricsService::Assembler)
                .map(|a| a.to_string()),
            Some("127.0.0.1:9100".to_string()),
            "{}",
            example.display()
        );
        let raw = std::fs::read_to_string(&example).unwrap();
        assert!(raw.contains("\"compression\"") && raw.contains("\"metrics_base_address\""));
    }
    let mut texts: Vec<(String, String)> = TEMPLATES
        .iter()
        .map(|t| (t.to_string(), read_unit(t)))
        .collect();
    texts.push((
        "detector.env.example".into(),
        std::fs::read_to_string(units_dir().join("detector.env.example")).unwrap(),
    ));
    texts.push((
        "docker-compose.yml".into(),
        std::fs::read_to_string(repo().join("docker/docker-compose.yml")).unwrap(),
    ));
    for (name, text) in texts {
        let active: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        for flag in ["--compression", "--metrics-addr", "STD_DAQ_COMPRESSION"] {
            assert!(
                !active.iter().any(|l| l.contains(flag)),
                "{name} still sets {flag}: the config carries it"
            );
        }
    }
}
