//! Running a snippet of code: [`Sandbox::run_code`].

use std::str::FromStr;

use crate::{Command, Error, Output, Process, Result, Sandbox};

/// Stdin messages stay well under the API's message size limit.
const STDIN_CHUNK: usize = 256 * 1024;

/// A language [`Sandbox::run_code`] can run. The image must have its
/// interpreter (`python3`, `sh`, `bash`, `node`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    Python,
    /// POSIX `sh`.
    Shell,
    Bash,
    JavaScript,
}

impl Language {
    /// The interpreter's argv; the code goes to its stdin.
    pub fn argv(self) -> &'static [&'static str] {
        match self {
            // -u: unbuffered, so output streams as it is printed.
            Language::Python => &["python3", "-u", "-"],
            Language::Shell => &["sh", "-s"],
            Language::Bash => &["bash", "-s"],
            Language::JavaScript => &["node", "-"],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Shell => "shell",
            Language::Bash => "bash",
            Language::JavaScript => "javascript",
        }
    }
}

impl FromStr for Language {
    type Err = Error;
    fn from_str(s: &str) -> Result<Language> {
        match s.trim().to_ascii_lowercase().as_str() {
            "python" | "python3" | "py" => Ok(Language::Python),
            "shell" | "sh" => Ok(Language::Shell),
            "bash" => Ok(Language::Bash),
            "javascript" | "js" | "node" => Ok(Language::JavaScript),
            other => Err(Error::InvalidArgument(format!(
                "unknown language {other:?}: use python, shell, bash or javascript"
            ))),
        }
    }
}

impl Sandbox {
    /// Starts `code` under the language's interpreter (the code is fed on
    /// stdin, so it may be of any size). `command` gives the environment,
    /// working directory, user and timeout; its argv is replaced.
    pub async fn spawn_code(
        &self,
        code: &str,
        language: Language,
        command: Command,
    ) -> Result<Process> {
        let cmd = command
            .with_argv(language.argv().iter().copied())
            .stdin(true);
        let process = self.spawn(cmd).await?;
        // A program that could not start has already exited: its exit
        // event is waiting, and stdin is closed.
        // Write errors are not reported here: a process that dies early
        // says why in its exit event.
        if process.pid() != 0 {
            for chunk in code.as_bytes().chunks(STDIN_CHUNK) {
                if process.write_stdin(chunk.to_vec()).await.is_err() {
                    break;
                }
            }
            let _ = process.close_stdin().await;
        }
        Ok(process)
    }

    /// Runs `code` to completion and collects its output.
    pub async fn run_code(&self, code: &str, language: Language) -> Result<Output> {
        self.spawn_code(code, language, Command::default())
            .await?
            .wait_with_output()
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_languages() {
        assert_eq!("Python".parse::<Language>().unwrap(), Language::Python);
        assert_eq!("sh".parse::<Language>().unwrap(), Language::Shell);
        assert_eq!("js".parse::<Language>().unwrap(), Language::JavaScript);
        let e = "cobol".parse::<Language>().unwrap_err().to_string();
        assert!(e.contains("cobol") && e.contains("python"), "{e}");
    }
}
