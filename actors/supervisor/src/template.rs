//! File injection templates: the subset of Go's text/template the seed names.
//!
//! `{{env "EXPR"}}` expands `$FOO`/`${FOO}` in EXPR against the agent's environment (as
//! [`crate::env::expand`] does); `{{secret "NAME"}}` is the content of the named secret. Go's
//! trim markers (`{{-` and `-}}`) trim the whitespace next to the action, and `{{/* ... */}}`
//! is a comment. Anything else inside `{{ }}` is an error naming it, so a typo never writes a
//! half-rendered file.

use crate::env::{expand, Env};

/// Why a template cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("'{{{{' at byte {0} is not closed by '}}}}'")]
    Unclosed(usize),
    #[error(
        "'{{{{{0}}}}}' is not supported: use {{{{env \"$NAME\"}}}} or {{{{secret \"NAME\"}}}}"
    )]
    Unsupported(String),
    #[error("{{{{secret \"{0}\"}}}}: no such secret")]
    NoSecret(String),
    #[error("{0}")]
    Env(String),
}

/// Renders `text`; `secret` returns a secret's content, or `None` when there is none.
pub fn render(
    text: &str,
    env: &Env,
    secret: &dyn Fn(&str) -> Option<String>,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut offset = 0;
    while let Some(i) = rest.find("{{") {
        let mut before = &rest[..i];
        let inner_start = i + 2;
        let Some(len) = rest[inner_start..].find("}}") else {
            return Err(TemplateError::Unclosed(offset + i));
        };
        let mut inner = &rest[inner_start..inner_start + len];
        let mut after = &rest[inner_start + len + 2..];
        if let Some(s) = inner.strip_prefix("- ") {
            before = before.trim_end();
            inner = s;
        }
        if let Some(s) = inner.strip_suffix(" -") {
            after = after.trim_start();
            inner = s;
        }
        out.push_str(before);
        out.push_str(&action(inner.trim(), env, secret)?);
        offset = text.len() - after.len();
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

fn action(
    inner: &str,
    env: &Env,
    secret: &dyn Fn(&str) -> Option<String>,
) -> Result<String, TemplateError> {
    if inner.starts_with("/*") && inner.ends_with("*/") {
        return Ok(String::new());
    }
    let unsupported = || TemplateError::Unsupported(inner.to_string());
    let (func, arg) = inner
        .split_once(char::is_whitespace)
        .ok_or_else(unsupported)?;
    let arg = arg.trim();
    let arg = arg
        .strip_prefix('"')
        .and_then(|a| a.strip_suffix('"'))
        .filter(|a| !a.contains('"'))
        .ok_or_else(unsupported)?;
    match func {
        "env" => expand(arg, env, arg).map_err(|e| TemplateError::Env(e.to_string())),
        "secret" => secret(arg).ok_or_else(|| TemplateError::NoSecret(arg.to_string())),
        _ => Err(unsupported()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        [
            ("SANDBOX_OWNER_EMAIL", "jo@example.com"),
            ("HOME", "/home/jo"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn secrets(name: &str) -> Option<String> {
        (name == "some-token").then(|| "s3cr3t".to_string())
    }

    #[test]
    fn the_seed_example_renders() {
        let t = "#!/bin/bash\necho \"for {{env \"$SANDBOX_OWNER_EMAIL\"}}\"\necho \"{{secret \"some-token\"}}\" >~/.my-token\n";
        assert_eq!(
            render(t, &env(), &secrets).unwrap(),
            "#!/bin/bash\necho \"for jo@example.com\"\necho \"s3cr3t\" >~/.my-token\n"
        );
    }

    #[test]
    fn env_expands_an_expression_and_braces() {
        assert_eq!(
            render("{{ env \"${HOME}/x:$NOPE.\" }}", &env(), &secrets).unwrap(),
            "/home/jo/x:."
        );
    }

    #[test]
    fn trim_markers_and_comments() {
        assert_eq!(
            render(
                "a  {{- env \"$HOME\" -}}  \n b{{/* note */}}c",
                &env(),
                &secrets
            )
            .unwrap(),
            "a/home/jobc"
        );
    }

    #[test]
    fn text_without_actions_is_unchanged() {
        let t = "plain { braces } and } }} too";
        assert_eq!(render(t, &env(), &secrets).unwrap(), t);
    }

    #[test]
    fn errors_name_what_is_wrong() {
        assert_eq!(
            render("x {{secret \"nope\"}}", &env(), &secrets),
            Err(TemplateError::NoSecret("nope".into()))
        );
        assert_eq!(
            render("ab {{env \"$X\"", &env(), &secrets),
            Err(TemplateError::Unclosed(3))
        );
        assert_eq!(
            render("{{env \"$HOME\"}} then {{ x", &env(), &secrets),
            Err(TemplateError::Unclosed(21))
        );
        let e = render("{{ .Values.x }}", &env(), &secrets).unwrap_err();
        assert!(e.to_string().contains(".Values.x"), "{e}");
        let e = render("{{ env HOME }}", &env(), &secrets).unwrap_err();
        assert!(e.to_string().contains("env HOME"), "{e}");
        let e = render("{{ env \"${}\" }}", &env(), &secrets).unwrap_err();
        assert!(matches!(e, TemplateError::Env(_)), "{e}");
    }
}
