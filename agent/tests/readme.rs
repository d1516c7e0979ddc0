//! The README stays true: every TOML example validates (paths under
//! /etc/plant-edge and credentials are stood in by files in a temporary
//! directory), and every `plant-edge ...` command line in it parses with
//! the real CLI (run with `--help` appended, so that commands needing a
//! PLC, a server or root only have their syntax checked). The demo and the
//! test command themselves are run by `demo.rs` and CI.

mod common;

use std::path::Path;

use common::*;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
        .expect("README.md")
}

/// Fenced blocks with their language tag, in order.
fn blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("```") {
            match current.take() {
                Some(block) => out.push(block),
                None => current = Some((rest.trim().to_owned(), String::new())),
            }
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// Splits a shell command line: whitespace-separated, double quotes group.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(word);
    }
    out
}

#[test]
fn every_toml_example_in_the_readme_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let etc = root.join("etc");
    let creds = root.join("credentials");
    std::fs::create_dir_all(&etc).expect("etc");
    std::fs::create_dir_all(&creds).expect("credentials");
    let mut checked = 0;
    for (i, (lang, body)) in blocks(&readme()).into_iter().enumerate() {
        if lang != "toml" {
            continue;
        }
        let mut text = body
            .replace("/etc/plant-edge/", &format!("{}/", etc.display()))
            .replace(
                "/var/lib/plant-edge",
                &root.join("var").display().to_string(),
            );
        // Stand-ins for every file the example names.
        for piece in text.split('"') {
            if let Some(name) = piece.strip_prefix(&format!("{}/", etc.display())) {
                std::fs::write(etc.join(name), "stand-in\n").expect("stand-in file");
            }
        }
        for line in text.lines() {
            let line = line.trim_start();
            if let Some(value) = line
                .strip_prefix("password_file = \"")
                .and_then(|v| v.split('"').next())
            {
                if !value.starts_with('/') {
                    std::fs::write(creds.join(value), "stand-in\n").expect("credential");
                }
            }
        }
        if !text.contains("[agent]") {
            text = format!(
                "[agent]\nsite = \"readme\"\ngateway = \"gw\"\nstate_dir = \"{}\"\n\n{text}",
                root.join("var").display()
            );
        }
        if !text.contains("[sinks.") {
            text.push_str(&format!(
                "\n[sinks.archive]\nkind = \"file\"\npath = \"{}/archive/events.jsonl\"\n",
                root.join("var").display()
            ));
        }
        let file = root.join(format!("readme-{i}.toml"));
        std::fs::write(&file, &text).expect("write");
        let out = bin()
            .args(["validate", "-c", file.to_str().expect("utf8")])
            .env("CREDENTIALS_DIRECTORY", &creds)
            .output()
            .expect("validate");
        assert!(
            out.status.success(),
            "README TOML block {i} does not validate:\n{}\n---\n{text}",
            stderr(&out)
        );
        checked += 1;
    }
    assert!(checked >= 4, "README TOML examples found: {checked}");
}

#[test]
fn every_plant_edge_command_in_the_readme_parses() {
    let mut commands = Vec::new();
    for (lang, body) in blocks(&readme()) {
        if lang != "sh" {
            continue;
        }
        let joined = body.replace("\\\n", " ");
        for line in joined.lines() {
            let line = line.split("  #").next().unwrap_or(line).trim();
            if let Some(rest) = line.strip_prefix("plant-edge ") {
                commands.push(rest.replace("<id-or-seq>", "1"));
            }
        }
    }
    assert!(commands.len() >= 12, "README commands found: {commands:?}");
    for command in &commands {
        let mut args = words(command);
        args.push("--help".into());
        let out = bin().args(&args).output().expect("plant-edge");
        assert!(
            out.status.success(),
            "`plant-edge {command}` does not parse:\n{}",
            stderr(&out)
        );
    }
}
