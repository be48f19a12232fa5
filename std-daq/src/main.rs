//! std-daq: the command line around the std-daq services.
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use std_daq::pipeline::{default_bin_dir, Pipeline, PipelineOptions};

/// std-daq: detector data acquisition (JUNGFRAU, EIGER, GigaFRoST) from UDP packets to HDF5.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the whole pipeline on one machine: a simulated JUNGFRAU (default 2 modules, 1024x1024)
    /// streamed by UDP through std-udp-recv, std-assembler and std-h5-writer into an HDF5 file,
    /// each a separate process, then prints rates and losses. Needs no RabbitMQ or Redis.
    Demo(DemoArgs),
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Images to acquire and write.
    #[arg(long, default_value_t = 1000)]
    images: u64,
    /// Frame rate of the simulated detector in Hz (0 = as fast as possible).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// The HDF5 file to write (must not exist yet).
    #[arg(long, default_value = "std-daq-demo.h5")]
    output: PathBuf,
    /// JUNGFRAU modules (1024x512 each, stacked vertically).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=32))]
    modules: u16,
    /// First UDP port; module m listens on port + m.
    #[arg(long, default_value_t = 50020)]
    port: u16,
    /// Packets the simulator leaves out: frame:module:packet,... (packet `*` = whole module frame).
    #[arg(long, default_value = "")]
    drop: String,
    /// Send with UDP GSO (for rates above ~1 GB/s).
    #[arg(long)]
    gso: bool,
    /// Slots per module FrameBuffer.
    #[arg(long, default_value_t = 256)]
    module_buffer_slots: u32,
    /// Size of the ImageBuffer in GiB.
    #[arg(long, default_value_t = 0.5)]
    ram_buffer_gb: f64,
    /// Keep the work folder (config, service logs) after a successful run.
    #[arg(long)]
    keep_logs: bool,
}

fn main() -> Result<()> {
    std_daq_common::service::init_logging("info");
    match Cli::parse().command {
        Cmd::Demo(args) => demo(args),
    }
}

fn demo(args: DemoArgs) -> Result<()> {
    let output = std::path::absolute(&args.output).context("resolving --output")?;
    if output.exists() {
        bail!(
            "{} already exists: choose another --output or remove it",
            output.display()
        );
    }
    let work_dir = std::env::temp_dir().join(format!("std-daq-demo.{}", std::process::id()));
    let opts = PipelineOptions {
        bin_dir: default_bin_dir()?,
        work_dir: work_dir.clone(),
        detector_name: format!("demo{}", std::process::id()),
        n_modules: args.modules,
        start_udp_port: args.port,
        module_buffer_slots: args.module_buffer_slots,
        ram_buffer_gb: args.ram_buffer_gb,
        log_level: "info".into(),
    };
    println!(
        "std-daq demo: starting 2 receivers, the assembler and the writer (logs in {})",
        work_dir.display()
    );
    let t0 = Instant::now();
    let mut pipeline = Pipeline::start(opts, Duration::from_secs(60))?;
    let ready = t0.elapsed();
    pipeline.start_run(&output, args.images)?;
    println!(
        "std-daq demo: sending {} frames at {} Hz",
        args.images, args.rate
    );
    let sim = pipeline.run_simulator(args.images, args.rate, &args.drop, args.gso)?;
    let run = pipeline.wait_run(Duration::from_secs(5))?;
    let stop = pipeline.stop()?;

    let image_mb = f64::from(args.modules) * 1024.0 * 1024.0 / 1e6;
    let sim_secs = sim.seconds.max(1e-9);
    println!();
    println!("std-daq demo summary");
    println!("  file:               {}", output.display());
    println!("  images requested:   {}", args.images);
    println!(
        "  images written:     {} (good {}, flagged {})",
        run.images_written, run.images_good, run.images_flagged
    );
    println!(
        "  image ids:          {:?} .. {:?}",
        run.first_image_id, run.last_image_id
    );
    println!(
        "  packets sent:       {} ({} left out on purpose)",
        sim.packets_sent, sim.packets_dropped
    );
    println!(
        "  packets lost:       {} (missing in written images)",
        run.missing_packets
    );
    println!("  images lost in shm: {}", run.images_lost_in_buffer);
    println!(
        "  detector rate:      {:.1} frames/s, {:.1} MB/s sent",
        sim.frames as f64 / sim_secs,
        sim.bytes_sent as f64 / sim_secs / 1e6
    );
    if run.seconds > 0.0 {
        println!(
            "  written:            {:.1} images/s, {:.1} MB/s over {:.2} s",
            run.images_written as f64 / run.seconds,
            run.images_written as f64 * image_mb / run.seconds,
            run.seconds
        );
    }
    println!("  start-up:           {:.2} s", ready.as_secs_f64());
    println!("  run ended:          {}", run.end);

    let mut problems = Vec::new();
    if !stop.failed.is_empty() {
        problems.push(format!(
            "services that did not exit cleanly: {:?}",
            stop.failed
        ));
    }
    if !stop.leftovers.is_empty() {
        problems.push(format!("left behind: {:?}", stop.leftovers));
    }
    if run.images_written != args.images {
        problems.push(format!(
            "only {} of {} images were written",
            run.images_written, args.images
        ));
    }
    if problems.is_empty() {
        if !args.keep_logs {
            let _ = std::fs::remove_dir_all(&work_dir);
        }
        println!("  clean shutdown:     yes (no processes, shm segments or ipc files left)");
        Ok(())
    } else {
        bail!(
            "{}\n(service logs kept in {})",
            problems.join("\n"),
            work_dir.display()
        )
    }
}
