//! The METHOD syntax of `qcl wpq compress-checkpoint --rule PATTERN=METHOD`.
//!
//! ```text
//! METHOD := NAME [":" KEY "=" VALUE ("," KEY "=" VALUE)*]
//! NAME   := fp16 | int<B> | rtn | gptq | pq
//! ```
//!
//! - `fp16`: every value in fp16 (no keys).
//! - `rtn`, `gptq`: round-to-nearest and GPTQ on per-group grids; keys are the fields of
//!   [`qcl_wpq::ScalarConfig`] (`bits`, `group`, `damp`, `block_columns`), defaults int4 g128.
//!   `group=channel` is one group per output channel.
//! - `int<B>`: `rtn:bits=B,group=channel` (so `int8` is int8 per channel); takes the same keys.
//! - `pq`: product quantization; keys are the fields of [`qcl_wpq::PqConfig`] (`d`, `k`,
//!   `objective`, `layout`, `sharing`, `em_iterations`, `finetune_rounds`, `ridge`, `damp`,
//!   `block_columns`, `outliers`, `guard`, and any field added to it later), defaults d4 K256
//!   activation-aware. `finetune` abbreviates `finetune_rounds`; `outliers=top(8)` keeps the 8
//!   input columns of largest second moment exactly (also for `rtn` and `gptq`);
//!   `guard=off` trusts the least-squares codebook fine-tune without the held-out check.
//!
//! Keys and word values may use `-` for `_` (`objective=error-feedback`). A value is a number,
//! `true`/`false`, `none`/`channel` (no value), `name(x)` for a variant with a value
//! (`sharing=rows(4)`) or a word. Unknown names and keys are errors that list the known ones.
//!
//! ```
//! use qcl_cli::method_spec::{parse_method, parse_rule};
//! use qcl_wpq::{Method, Objective, PqConfig, ScalarConfig};
//! let m = parse_method("pq:d=2,k=256,objective=error-feedback,finetune=1")?;
//! let expected = PqConfig { finetune_rounds: 1, ..PqConfig::new(2, 256, Objective::ErrorFeedback) };
//! assert_eq!(m, Method::Pq(expected));
//! assert_eq!(parse_method("int8")?, Method::Rtn(ScalarConfig::new(8, None)));
//! assert_eq!(parse_method("gptq:bits=3,group=128")?, Method::Gptq(ScalarConfig::new(3, Some(128))));
//! let rule = parse_rule("encoder.layer.*.dense.weight=rtn:bits=4,group=32")?;
//! assert!(rule.pattern.matches("encoder.layer.0.output.dense.weight"));
//! let m = parse_method("pq:d=2,k=64,objective=error-feedback,outliers=top(8),guard=off")?;
//! let Method::Pq(p) = m else { unreachable!() };
//! assert_eq!((p.outliers, p.guard), (qcl_wpq::OutlierColumns::Top(8), qcl_wpq::FinetuneGuard::Off));
//! assert!(parse_method("pq:q=3").is_err()); // unknown key
//! # Ok::<(), qcl_tensor::Error>(())
//! ```

use qcl_tensor::{Error, Result};
use qcl_wpq::{Method, Rule};
use serde_json::{Map, Value};

/// Method names, as the error for an unknown one lists them.
pub const METHOD_NAMES: &str = "fp16, int<B> (e.g. int8), rtn, gptq, pq";

/// Parses `PATTERN=METHOD` (split at the first `=`; patterns hold no `=`).
///
/// # Errors
/// [`Error::InvalidParameter`] for a missing `=`, an invalid pattern ([`qcl_wpq::Pattern::new`])
/// or method ([`parse_method`]).
pub fn parse_rule(rule: &str) -> Result<Rule> {
    let (pattern, method) = rule.split_once('=').ok_or_else(|| {
        Error::invalid_parameter(
            "rule",
            format!("`{rule}` is not PATTERN=METHOD (e.g. `encoder.*.weight=rtn:bits=4`)"),
        )
    })?;
    Rule::new(pattern.trim(), parse_method(method.trim())?)
}

/// Parses a METHOD (see the module documentation).
///
/// # Errors
/// [`Error::InvalidParameter`] naming the unknown method or key, or the value that does not fit.
pub fn parse_method(spec: &str) -> Result<Method> {
    let bad = |reason: String| Error::invalid_parameter("method", format!("`{spec}`: {reason}"));
    let (name, keys) = match spec.split_once(':') {
        Some((name, keys)) => (name.trim(), keys),
        None => (spec.trim(), ""),
    };
    let mut fields = Map::new();
    for pair in split_top_level(keys)
        .into_iter()
        .filter(|p| !p.trim().is_empty())
    {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| bad(format!("`{pair}` is not KEY=VALUE")))?;
        let key = match key.trim().replace('-', "_").as_str() {
            "finetune" => "finetune_rounds".to_string(),
            other => other.to_string(),
        };
        if fields.insert(key.clone(), value_of(value.trim())).is_some() {
            return Err(bad(format!("key `{key}` given twice")));
        }
    }
    let (variant, fields) = match name {
        "fp16" if fields.is_empty() => return Ok(Method::Fp16),
        "fp16" => return Err(bad("fp16 takes no keys".into())),
        "rtn" | "gptq" | "pq" => (name.to_string(), fields),
        int if int.starts_with("int") => {
            let bits: u32 = int[3..]
                .parse()
                .map_err(|_| bad(format!("unknown method `{name}`; known: {METHOD_NAMES}")))?;
            let mut all = Map::from_iter([("bits".to_string(), bits.into())]);
            all.insert("group".into(), Value::Null);
            if fields.contains_key("bits") {
                return Err(bad(format!("`{name}` fixes the bits")));
            }
            all.extend(fields);
            ("rtn".to_string(), all)
        }
        _ => {
            return Err(bad(format!(
                "unknown method `{name}`; known: {METHOD_NAMES}"
            )))
        }
    };
    let json = Value::Object(Map::from_iter([(variant, Value::Object(fields))]));
    serde_json::from_value(json).map_err(|e| bad(e.to_string()))
}

/// Splits at commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A VALUE as JSON: number, boolean, null (`none`, `channel`), `name(x)` → `{"name": x}`, or a
/// word with `-` read as `_`.
fn value_of(v: &str) -> Value {
    if let Ok(i) = v.parse::<u64>() {
        return i.into();
    }
    if let Ok(x) = v.parse::<f64>() {
        return x.into();
    }
    match v {
        "true" => return true.into(),
        "false" => return false.into(),
        "none" | "channel" => return Value::Null,
        _ => {}
    }
    if let Some((name, inner)) = v.strip_suffix(')').and_then(|r| r.split_once('(')) {
        return Value::Object(Map::from_iter([(
            name.trim().replace('-', "_"),
            value_of(inner.trim()),
        )]));
    }
    Value::String(v.replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use qcl_wpq::{Objective, PqConfig, ScalarConfig, Sharing};

    #[test]
    fn names_and_defaults() {
        assert_eq!(parse_method("fp16").unwrap(), Method::Fp16);
        assert_eq!(
            parse_method("rtn").unwrap(),
            Method::Rtn(ScalarConfig::default())
        );
        assert_eq!(parse_method("pq").unwrap(), Method::Pq(PqConfig::default()));
        assert_eq!(
            parse_method("int4:group=32").unwrap(),
            Method::Rtn(ScalarConfig::new(4, Some(32)))
        );
        assert_eq!(
            parse_method("rtn:bits=8,group=channel").unwrap(),
            Method::Rtn(ScalarConfig::new(8, None))
        );
        let p =
            parse_method("pq:d=4,k=16,objective=naive,sharing=rows(2),ridge=0.5,em-iterations=3")
                .unwrap();
        assert_eq!(
            p,
            Method::Pq(PqConfig {
                sharing: Sharing::Rows(2),
                ridge: 0.5,
                em_iterations: 3,
                ..PqConfig::new(4, 16, Objective::Naive)
            })
        );
    }

    #[test]
    fn errors_name_the_problem() {
        for (spec, needle) in [
            ("zstd", "unknown method `zstd`"),
            ("intx", "unknown method `intx`"),
            ("fp16:bits=3", "takes no keys"),
            ("pq:q=3", "unknown field `q`"),
            ("pq:d", "not KEY=VALUE"),
            ("pq:d=2,d=4", "given twice"),
            ("rtn:bits=four", "\"four\""),
            ("int8:bits=4", "fixes the bits"),
            ("pq:objective=best", "unknown variant `best`"),
        ] {
            let e = parse_method(spec).unwrap_err();
            assert_eq!(e.kind(), "invalid_parameter");
            assert!(e.to_string().contains(needle), "{spec}: {e}");
        }
        let e = parse_rule("encoder.weight").unwrap_err();
        assert!(e.to_string().contains("PATTERN=METHOD"), "{e}");
        assert!(parse_rule("a[0]=fp16").is_err());
        assert!(parse_rule("=fp16").is_err());
    }

    proptest! {
        /// Every combination of the documented PQ keys reads back as the same parameters.
        #[test]
        fn pq_keys_round_trip(
            d in 1usize..9, k in 1usize..70_000, objective in 0usize..3, ft in 0usize..4,
            em in 0usize..50, rows in proptest::option::of(1usize..8),
        ) {
            let objectives = [
                ("naive", Objective::Naive),
                ("activation-aware", Objective::ActivationAware),
                ("error_feedback", Objective::ErrorFeedback),
            ];
            let (name, objective) = objectives[objective];
            let sharing = rows.map_or("layer".to_string(), |r| format!("rows({r})"));
            let spec = format!(
                "pq:d={d},k={k},objective={name},finetune={ft},em-iterations={em},sharing={sharing}"
            );
            let expected = PqConfig {
                finetune_rounds: ft,
                em_iterations: em,
                sharing: rows.map_or(Sharing::Layer, Sharing::Rows),
                ..PqConfig::new(d, k, objective)
            };
            prop_assert_eq!(parse_method(&spec).unwrap(), Method::Pq(expected));
        }

        /// Scalar methods: `intB` and `rtn:bits=B` agree, with and without a group.
        #[test]
        fn int_shorthand_is_rtn(bits in 1u32..9, group in proptest::option::of(1usize..512)) {
            let g = group.map_or("channel".to_string(), |g| g.to_string());
            let short = parse_method(&format!("int{bits}:group={g}")).unwrap();
            let long = parse_method(&format!("rtn:bits={bits},group={g}")).unwrap();
            prop_assert_eq!(short, long);
            prop_assert_eq!(long, Method::Rtn(ScalarConfig::new(bits, group)));
        }
    }
}
