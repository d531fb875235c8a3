//! The `unimem` binary as a user runs it.

use std::process::{Command, Stdio};

const UNIMEM: &str = env!("CARGO_BIN_EXE_unimem");

#[test]
fn version_names_the_command() {
    let output = Command::new(UNIMEM).arg("--version").output().expect("run unimem --version");
    assert!(output.status.success(), "unimem --version failed: {output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("unimem "), "unimem --version printed {stdout:?}");
    assert!(stdout.trim_end().ends_with(env!("CARGO_PKG_VERSION")), "unimem --version printed {stdout:?}");
}

/// `unimem devices | head -1`: the reader goes away before the output is written.
#[test]
fn devices_into_a_closed_pipe_is_no_panic() {
    let mut child = Command::new(UNIMEM)
        .arg("devices")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run unimem devices");
    drop(child.stdout.take()); // close the read end before the child writes
    let output = child.wait_with_output().expect("wait for unimem devices");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "unimem devices panicked on a closed pipe:\n{stderr}");
    #[cfg(unix)]
    let killed_by_sigpipe = std::os::unix::process::ExitStatusExt::signal(&output.status) == Some(13);
    #[cfg(not(unix))]
    let killed_by_sigpipe = false;
    assert!(
        output.status.success() || killed_by_sigpipe,
        "unimem devices on a closed pipe exited with {}:\n{stderr}",
        output.status
    );
}

fn unimem(args: &[&str]) -> std::process::Output {
    Command::new(UNIMEM).args(args).stdin(Stdio::null()).output().expect("run unimem")
}

fn json_of(output: &std::process::Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "unimem failed: {}\n{stderr}", output.status);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stderr}"))
}

#[test]
fn devices_as_json_list_the_cpu_first() {
    let json = json_of(&unimem(&["devices", "--json"]));
    let devices = json["devices"].as_array().expect("a devices array");
    assert_eq!(devices[0]["kind"], "Cpu", "{json}");
    assert!(json["backend_notes"].is_array(), "{json}");
    if std::env::var_os("UNIMEM_REQUIRE_OPENCL").is_some() {
        assert!(devices.iter().any(|d| d["kind"] == "OpenCl"), "no OpenCL device: {json}");
    }
}

/// Every ratio of a row: finite and positive.
fn check_ratios(row: &serde_json::Value) {
    if !row["skipped"].is_null() {
        assert!(row["skipped"]["reason"].as_str().is_some_and(|r| !r.is_empty()), "{row}");
        return;
    }
    assert!(row["unimem"]["median_ns"].as_f64().is_some_and(|t| t.is_finite() && t > 0.0), "{row}");
    for baseline in row["baselines"].as_array().expect("baselines") {
        let speedup = baseline["speedup"].as_f64().expect("a speedup");
        assert!(speedup.is_finite() && speedup > 0.0, "{row}");
    }
}

#[test]
fn a_quick_bench_reports_every_table_for_every_device_as_json() {
    let output = unimem(&["bench", "--quick", "--json", "-"]);
    let json = json_of(&output);
    let tables = String::from_utf8_lossy(&output.stderr);
    assert!(
        tables.contains("Allocation") && tables.contains("Transfer bandwidth"),
        "tables go to stderr:\n{tables}"
    );
    for key in ["unimem_version", "timestamp", "machine", "settings"] {
        assert!(!json[key].is_null(), "no {key}: {json}");
    }
    let devices = json["devices"].as_array().expect("devices");
    assert_eq!(devices[0]["kind"], "Cpu");
    // The host's allocation table has the two-thread, warm write, pipeline and object pool
    // rows, measured.
    let host = devices[0]["allocation"].as_array().expect("allocation table");
    for operation in [
        "two threads, one class",
        "warm allocate + write every byte + drop",
        "pipeline, dropped on another thread",
        "object pool rent + return",
        "object pool pipeline",
    ] {
        assert!(
            host.iter().any(|r| r["operation"].as_str().is_some_and(|o| o.starts_with(operation))
                && r["skipped"].is_null()),
            "no measured {operation:?} row on the host"
        );
    }
    if std::env::var_os("UNIMEM_REQUIRE_OPENCL").is_some() {
        assert!(devices.iter().any(|d| d["kind"] == "OpenCl"), "no OpenCL device measured");
    }
    for device in devices {
        for table in ["allocation", "transfer", "pool"] {
            let rows = device[table].as_array().unwrap_or_else(|| panic!("no {table} table: {device}"));
            assert!(
                rows.iter().any(|r| r["skipped"].is_null()),
                "nothing measured in {table} of {}",
                device["name"]
            );
            rows.iter().for_each(check_ratios);
        }
        let pool = device["pool"].as_array().unwrap();
        for trace in ["random", "training"] {
            for divisions in [1, 4] {
                assert!(
                    pool.iter().any(|r| r["pool"]["trace"].as_str().is_some_and(|t| t.starts_with(trace))
                        && r["pool"]["divisions"] == divisions),
                    "no {trace} trace with {divisions} divisions on {}",
                    device["name"]
                );
            }
        }
    }
}

#[test]
fn an_unknown_device_is_an_error_that_lists_the_devices() {
    for selector in ["7", "tpu"] {
        let output = unimem(&["bench", "--quick", "--device", selector]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "--device {selector} was accepted");
        assert!(stderr.contains(&format!("no device \"{selector}\"")) && stderr.contains("cpu"), "{stderr}");
        assert!(
            output.stdout.is_empty(),
            "measured before refusing: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
}

#[test]
fn unwritable_output_paths_are_refused_before_measuring() {
    let missing = std::env::temp_dir().join("unimem-no-such-dir").join("deeper");
    let file = missing.join("out.json");
    let not_a_dir = std::env::temp_dir().join(format!("unimem-plain-file-{}", std::process::id()));
    std::fs::write(&not_a_dir, "x").unwrap();
    for args in [
        vec!["--json", file.to_str().unwrap()],
        vec!["--csv", file.to_str().unwrap()],
        vec!["--plot", not_a_dir.to_str().unwrap()],
        vec!["--json", "-", "--csv", "-"],
    ] {
        let output = unimem(&[&["bench", "--quick"][..], &args].concat());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(output.stdout.is_empty(), "{args:?}: measured before refusing");
        assert!(stderr.contains("cannot") || stderr.contains("both ask for stdout"), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_file(not_a_dir);
}

#[test]
fn a_malformed_trace_names_its_line() {
    let path = std::env::temp_dir().join(format!("unimem-bad-trace-{}.csv", std::process::id()));
    std::fs::write(&path, "op,size,id\nalloc,4096,1\nfree,,1\nresize,10,2\n").unwrap();
    let output = unimem(&["bench", "--quick", "--trace", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a malformed trace was accepted");
    assert!(output.stdout.is_empty(), "measured before refusing");
    assert!(stderr.contains("line 4"), "{stderr}");
    let _ = std::fs::remove_file(path);
}

/// `unimem bench | head -1`: the reader goes away; the run neither panics nor fails.
#[test]
fn bench_into_a_closed_pipe_is_no_panic() {
    let mut child = Command::new(UNIMEM)
        .args(["bench", "--quick", "--device", "cpu"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run unimem bench");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("wait for unimem bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "unimem bench panicked on a closed pipe:\n{stderr}");
    assert!(
        output.status.success(),
        "unimem bench on a closed pipe exited with {}:\n{stderr}",
        output.status
    );
}
