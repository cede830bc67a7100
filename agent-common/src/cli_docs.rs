//! Shell completion scripts and man pages made from an agent's own clap definitions, so that
//! what the packages install (packaging/build.sh) always describes the binary they carry.
//!
//! - `completions bash|zsh|fish`, a subcommand of both agents, prints the completion script on
//!   stdout ([`completions`]).
//! - `generate-man DIR` writes the man pages, section 1: `NAME.1` for the program and
//!   `NAME-SUBCOMMAND.1` for each subcommand ([`write_man_pages`]). It is not in the agents'
//!   clap definitions: [`parse`] adds it, hidden, to the command it parses with and to no
//!   other, so neither `--help`, the man pages nor the completion scripts name it (clap's
//!   completion generators list hidden subcommands too).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Command, Parser};

/// The hidden subcommand that writes the man pages.
pub const GENERATE_MAN: &str = "generate-man";

/// The shells `completions` writes a script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

impl Shell {
    fn generator(self) -> clap_complete::Shell {
        match self {
            Shell::Bash => clap_complete::Shell::Bash,
            Shell::Zsh => clap_complete::Shell::Zsh,
            Shell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// Parses the process's arguments as `T` does (`T::parse()`: usage errors, `--help` and
/// `--version` print and exit), with `generate-man DIR` added: that writes the man pages of
/// `T` into DIR and comes back as `Err` with the exit code.
pub fn parse<T: Parser>() -> Result<T, ExitCode> {
    let mut cmd = T::command().subcommand(
        Command::new(GENERATE_MAN)
            .hide(true)
            .about("Write the man pages (NAME.1, NAME-SUBCOMMAND.1) into DIR")
            .arg(
                clap::Arg::new("DIR")
                    .required(true)
                    .value_parser(clap::value_parser!(PathBuf)),
            ),
    );
    let mut matches = cmd.get_matches_mut();
    if let Some((GENERATE_MAN, sub)) = matches.subcommand() {
        return Err(match sub.get_one::<PathBuf>("DIR") {
            Some(dir) => man_pages(T::command(), dir),
            None => ExitCode::from(2),
        });
    }
    match T::from_arg_matches_mut(&mut matches) {
        Ok(parsed) => Ok(parsed),
        Err(e) => e.format(&mut cmd).exit(),
    }
}

/// `completions SHELL`: the completion script for `cmd` on stdout.
pub fn completions(mut cmd: Command, shell: Shell) -> ExitCode {
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell.generator(), &mut cmd, name.clone(), &mut script);
    match std::io::stdout().lock().write_all(&script) {
        Ok(()) => ExitCode::SUCCESS,
        // `completions bash | head`: the reader has what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: cannot write the completion script: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `generate-man DIR`: [`write_man_pages`], each page's path on stdout.
pub fn man_pages(cmd: Command, dir: &Path) -> ExitCode {
    let name = cmd.get_name().to_string();
    match write_man_pages(cmd, dir) {
        Ok(pages) => {
            let list: String = pages.iter().map(|p| format!("{}\n", p.display())).collect();
            // The pages are written; a closed stdout loses only their list.
            let _ = std::io::stdout().lock().write_all(list.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "{name}: cannot write the man pages in {}: {e}",
                dir.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// Writes a section-1 man page for `cmd` and one for each of its subcommands (recursively;
/// hidden ones and clap's `help` left out) into `dir`, which is created if missing: `NAME.1`,
/// `NAME-SUBCOMMAND.1`. Returns the paths written, the program's first.
pub fn write_man_pages(cmd: Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    // Gives every subcommand its display name (`vmsync-host-status`), the page's title.
    cmd.build();
    let source = format!(
        "{} {}",
        cmd.get_name(),
        cmd.get_version().unwrap_or_default()
    );
    let mut written = Vec::new();
    write_pages(&cmd, dir, &source, &mut written)?;
    Ok(written)
}

fn write_pages(
    cmd: &Command,
    dir: &Path,
    source: &str,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone())
        .source(source.to_string())
        .manual("vmsync");
    let mut page = Vec::new();
    man.render(&mut page)?;
    let path = dir.join(man.get_filename());
    std::fs::write(&path, page)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, source, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> Command {
        Command::new("demo")
            .version("1.2.3")
            .about("A demo program")
            .subcommand(Command::new("run").about("Run it"))
            .subcommand(Command::new("secret").hide(true))
            .subcommand(Command::new("outer").subcommand(Command::new("inner").about("Nested")))
    }

    #[test]
    fn one_page_per_visible_command_named_after_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let pages = write_man_pages(demo(), dir.path()).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["demo.1", "demo-run.1", "demo-outer.1", "demo-outer-inner.1"]
        );
        let run = std::fs::read_to_string(dir.path().join("demo-run.1")).unwrap();
        assert!(
            run.lines().any(|l| l.starts_with(".TH demo-run 1 ")),
            "{run}"
        );
        assert!(run.contains("\"demo 1.2.3\""), "{run}");
        assert!(run.contains("Run it"), "{run}");
        let top = std::fs::read_to_string(dir.path().join("demo.1")).unwrap();
        assert!(!top.contains("secret"), "{top}");
        assert!(top.contains("demo\\-run(1)"), "{top}");
        assert!(!top.contains("demo\\-help"), "{top}");
    }

    #[test]
    fn an_unwritable_directory_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(write_man_pages(demo(), &file.join("man")).is_err());
    }
}
