//! The binary as a user first meets it, without a cluster: its help, and the error when there is
//! no cluster to talk to. (Against a cluster: e2e/tests/plugin.rs.)

use std::process::Command;

fn plugin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kubectl-charlm"))
}

#[test]
fn help_lists_the_subcommands_and_kubectls_flags() {
    let out = plugin().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "status",
        "logs",
        "sample",
        "export",
        "--kubeconfig",
        "--context",
        "--namespace",
    ] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
    let out = plugin().args(["sample", "--help"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("--prompt") && text.contains("--image") && text.contains("--timeout"),
        "{text}"
    );
}

#[test]
fn a_missing_kubeconfig_is_named() {
    let out = plugin()
        .args(["--kubeconfig", "/nonexistent/kubeconfig", "status", "demo"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("error: cannot read the kubeconfig /nonexistent/kubeconfig (--kubeconfig)"),
        "{err}"
    );
}

#[test]
fn a_subcommand_without_its_name_is_a_usage_error() {
    let out = plugin().arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    let out = plugin().args(["export", "demo"]).output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--to"), "{err}");
}
