//! `somna completions SHELL`: shell completion scripts.

use clap::{Args, CommandFactory};
use clap_complete::Shell;

#[derive(Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    shell: Shell,
}

/// Prints the completion script for `somna` to stdout, e.g.
/// `somna completions bash > /etc/bash_completion.d/somna`.
pub fn run<C: CommandFactory>(args: CompletionsArgs) -> anyhow::Result<i32> {
    let mut cmd = C::command();
    clap_complete::generate(args.shell, &mut cmd, "somna", &mut std::io::stdout());
    Ok(0)
}
