//! What the packages ship that the agents make themselves (packaging/build.sh): completion
//! scripts, man pages, and the annotated default configurations. One table of both agents.

// Integration tests: helpers outside #[test] fns panic on broken fixtures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use vmsync_tests::agents::bin;

struct Agent {
    name: &'static str,
    /// Every command a user can run: what `completions` and the man pages must name.
    subcommands: &'static [&'static str],
    /// The annotated configuration the package installs, in packaging/.
    config: &'static str,
    /// The smallest configuration `check` reads a `[[share]]` of, its last line left for a
    /// `bogus` key.
    with_share: &'static str,
}

const AGENTS: [Agent; 2] = [
    Agent {
        name: "vmsync-host",
        subcommands: &[
            "run",
            "check",
            "status",
            "metrics",
            "sync",
            "wait",
            "resume",
            "resolve",
            "trash",
            "restore",
            "completions",
        ],
        config: "host-vm.toml",
        with_share: "guest = \"unix:/g.sock\"\n[[share]]\nname = \"a\"\npath = \"/a\"\n",
    },
    Agent {
        name: "vmsync-guest",
        subcommands: &["run", "check", "status", "trash", "restore", "completions"],
        config: "guest.toml",
        with_share: "[[share]]\nname = \"a\"\npath = \"/a\"\n",
    },
];

fn run(agent: &Agent) -> Command {
    Command::new(bin(agent.name))
}

/// `completions SHELL` names every subcommand, and not the hidden `generate-man`; the bash
/// script completes them at the top level; an unknown shell is a usage error.
#[test]
fn completions_name_every_subcommand() {
    for agent in &AGENTS {
        let name = agent.name;
        for shell in ["bash", "zsh", "fish"] {
            let out = run(agent).args(["completions", shell]).output().unwrap();
            assert!(out.status.success(), "{name} {shell}");
            let script = String::from_utf8_lossy(&out.stdout);
            assert!(
                !script.contains("generate-man"),
                "{name} {shell}:\n{script}"
            );
            for cmd in agent.subcommands {
                assert!(script.contains(cmd), "{name} {shell}: `{cmd}` missing");
            }
        }
        let out = run(agent).args(["completions", "bash"]).output().unwrap();
        let script = String::from_utf8_lossy(&out.stdout);
        // The top level's candidates: `opts="-h -V --help --version run check ..."`.
        let top = script
            .lines()
            .find_map(|l| l.trim().strip_prefix("opts=\"-h -V --help --version "))
            .unwrap_or_else(|| panic!("{name}: no top-level opts line:\n{script}"));
        let words: Vec<&str> = top.trim_end_matches('"').split_whitespace().collect();
        for cmd in agent.subcommands {
            assert!(
                words.contains(cmd),
                "{name}: `{cmd}` not completed: {words:?}"
            );
        }
        let out = run(agent).args(["completions", "tcsh"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
    }
}

/// The hidden `generate-man DIR` writes one man page for the program and one per subcommand,
/// each a man(7) page groff reads without a warning, the program's naming the others.
#[test]
fn generate_man_writes_a_parseable_page_per_subcommand() {
    let groff = Command::new("groff").arg("--version").output().is_ok();
    for agent in &AGENTS {
        let name = agent.name;
        let dir = tempfile::tempdir().unwrap();
        let man = dir.path().join("man1");
        let out = run(agent).arg("generate-man").arg(&man).output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pages: Vec<String> = agent
            .subcommands
            .iter()
            .map(|c| format!("{name}-{c}"))
            .collect();
        pages.push(name.to_string());
        let mut want: Vec<String> = pages.iter().map(|n| format!("{n}.1")).collect();
        want.sort();
        let mut found: Vec<String> = std::fs::read_dir(&man)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        found.sort();
        assert_eq!(found, want, "{name}");
        for page_name in &pages {
            let path = man.join(format!("{page_name}.1"));
            let page = std::fs::read_to_string(&path).unwrap();
            let title = format!(".TH {page_name} 1 ");
            assert!(page.lines().any(|l| l.starts_with(&title)), "{page}");
            for section in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS"] {
                assert!(page.contains(section), "{page_name}: no {section}:\n{page}");
            }
            if groff {
                let out = Command::new("groff")
                    .args(["-man", "-Tutf8", "-ww", "-z"])
                    .arg(&path)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{page_name}");
                assert!(
                    out.stderr.is_empty(),
                    "{page_name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let top = std::fs::read_to_string(man.join(format!("{name}.1"))).unwrap();
        let see_also = format!("{}\\-status(1)", name.replace('-', "\\-"));
        assert!(top.contains(&see_also), "{top}");
    }
}

/// The keys `agent`'s `check` knows in `config` at its `line`, as its message for an unknown
/// key `bogus` there lists them.
fn known_keys(agent: &Agent, config: &str, line: usize) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("probe.toml");
    std::fs::write(&file, config).unwrap();
    let out = run(agent)
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let list = stderr
        .lines()
        .find(|l| l.contains(&format!("probe.toml:{line}:1: unknown field `bogus`")))
        .and_then(|l| l.split_once("expected one of "))
        .unwrap_or_else(|| panic!("{}: no list of keys in:\n{stderr}", agent.name))
        .1;
    list.split(", ")
        .map(|k| k.trim_matches('`').to_string())
        .filter(|k| k != "share")
        .collect()
}

/// The configuration each package installs under /etc/vmsync: every key the agent knows is
/// there (set, or commented out at its default), and with every commented-out key set the
/// file still passes `check`.
#[test]
fn the_annotated_configurations_name_every_key() {
    for agent in &AGENTS {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging")
            .join(agent.config);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut keys = known_keys(agent, "bogus = 1\n", 1);
        let share_lines = agent.with_share.lines().count();
        keys.extend(known_keys(
            agent,
            &format!("{}bogus = 1\n", agent.with_share),
            share_lines + 1,
        ));
        assert!(keys.len() >= 8, "{}: {keys:?}", agent.name);
        for key in &keys {
            let set = format!("{key} = ");
            assert!(
                text.lines()
                    .any(|l| l.trim_start_matches('#').starts_with(&set)),
                "{key} missing from {}",
                path.display()
            );
        }
        let all_set: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if keys.iter().any(|k| rest.starts_with(&format!("{k} = "))) => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(agent.config);
        std::fs::write(&file, &all_set).unwrap();
        let out = run(agent)
            .args(["check", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}\n{all_set}",
            agent.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
