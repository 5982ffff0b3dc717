//! `charter check`: validate constitution files, printing every error.

use std::path::PathBuf;
use std::process::ExitCode;

use charter::constitution;

pub fn check(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for file in files {
        match constitution::parse_file(file) {
            Ok(c) => {
                let examples: usize = c
                    .rules
                    .iter()
                    .map(|r| r.violating.len() + r.compliant.len())
                    .sum::<usize>()
                    + c.shared_compliant.len();
                println!(
                    "{}: ok: constitution {:?} version {} with {} rules and {} exemplars{}",
                    file.display(),
                    c.id,
                    c.version,
                    c.rules.len(),
                    examples,
                    if c.calibrations.is_empty() {
                        String::new()
                    } else {
                        let models: Vec<&str> =
                            c.calibrations.iter().map(|c| c.model.as_str()).collect();
                        format!(" (calibrated for {})", models.join(", "))
                    }
                );
                let mut models: Vec<&str> =
                    c.calibrations.iter().map(|c| c.model.as_str()).collect();
                if models.is_empty() {
                    models.push("any model");
                }
                for model in models {
                    let silent = c.silent_rules(model);
                    if !silent.is_empty() {
                        println!(
                            "{}: warning: with {model}, these rules can never be violated: {}",
                            file.display(),
                            silent.join(", ")
                        );
                    }
                }
            }
            Err(errors) => {
                ok = false;
                for e in errors.0 {
                    eprintln!("{e}");
                }
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
