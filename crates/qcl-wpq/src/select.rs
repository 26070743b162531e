//! Which tensors to compress, and how: name patterns, first match wins.

use qcl_tensor::{Error, Result, Seed};
use serde::{Deserialize, Serialize};

use crate::compressor::Method;

/// A glob-like tensor name pattern: `*` matches any run of characters (dots included), `?` one
/// character, everything else itself.
///
/// ```
/// use qcl_wpq::Pattern;
/// let p = Pattern::new("encoder.layer.*.attention.self.*.weight")?;
/// assert!(p.matches("encoder.layer.0.attention.self.query.weight"));
/// assert!(!p.matches("encoder.layer.0.attention.self.query.bias"));
/// assert!(Pattern::new("encoder.layer.[0-3].weight").is_err());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Pattern(String);

impl Pattern {
    /// Checks the pattern.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an empty pattern or one using glob syntax this matcher
    /// does not know (`[`, `]`, `{`, `}`).
    pub fn new(pattern: impl Into<String>) -> Result<Self> {
        let pattern = pattern.into();
        if pattern.is_empty() || pattern.contains(['[', ']', '{', '}']) {
            return Err(Error::invalid_parameter(
                "pattern",
                format!(
                    "unknown pattern `{pattern}`: use names with `*` (any run) and `?` (one \
                     character)"
                ),
            ));
        }
        Ok(Pattern(pattern))
    }

    /// The pattern's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        let (p, n): (Vec<char>, Vec<char>) = (self.0.chars().collect(), name.chars().collect());
        let (mut i, mut j) = (0, 0);
        // Position after the last `*` in the pattern and the name position it matched up to.
        let mut star: Option<(usize, usize)> = None;
        while j < n.len() {
            if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
                i += 1;
                j += 1;
            } else if i < p.len() && p[i] == '*' {
                star = Some((i + 1, j));
                i += 1;
            } else if let Some((si, sj)) = star {
                // Let the last `*` swallow one more character.
                i = si;
                j = sj + 1;
                star = Some((si, sj + 1));
            } else {
                return false;
            }
        }
        p[i..].iter().all(|&c| c == '*')
    }

    fn is_literal(&self) -> bool {
        !self.0.contains(['*', '?'])
    }
}

impl TryFrom<String> for Pattern {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Pattern::new(s)
    }
}

impl From<Pattern> for String {
    fn from(p: Pattern) -> String {
        p.0
    }
}

/// Tensors matching `pattern` are compressed by `method`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Tensor names.
    pub pattern: Pattern,
    /// How to compress them.
    pub method: Method,
}

impl Rule {
    /// A rule.
    ///
    /// # Errors
    /// As [`Pattern::new`].
    pub fn new(pattern: &str, method: Method) -> Result<Self> {
        Ok(Rule {
            pattern: Pattern::new(pattern)?,
            method,
        })
    }
}

/// The rules of a compression (first match wins; tensors no rule matches stay as they are) and
/// the seed of every random choice.
///
/// ```
/// use qcl_wpq::{Method, Plan, Rule, ScalarConfig};
/// let plan = Plan::new(vec![
///     Rule::new("*.query.weight", Method::Fp16)?,
///     Rule::new("*.weight", Method::Rtn(ScalarConfig::new(8, None)))?,
/// ]);
/// let names = ["a.query.weight", "a.query.bias", "a.key.weight"];
/// let chosen = plan.select(names.iter().copied())?;
/// assert_eq!(chosen, vec![("a.key.weight".to_string(), 1), ("a.query.weight".to_string(), 0)]);
/// // A pattern that matches nothing is an error.
/// let plan = Plan::new(vec![Rule::new("decoder.*", Method::Fp16)?]);
/// assert!(plan.select(names.iter().copied()).is_err());
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Rules in order.
    pub rules: Vec<Rule>,
    /// Seed (each tensor draws from its own child, named by the tensor).
    #[serde(default)]
    pub seed: Seed,
}

impl Plan {
    /// Rules with seed 0.
    pub fn new(rules: Vec<Rule>) -> Self {
        Plan {
            rules,
            seed: Seed::new(0),
        }
    }

    /// The same plan with another seed.
    pub fn with_seed(mut self, seed: impl Into<Seed>) -> Self {
        self.seed = seed.into();
        self
    }

    /// `(name, index of its rule)` of every name a rule matches, sorted by name.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming a rule that matches no name (an unknown tensor name
    /// or pattern), or for a plan without rules.
    pub fn select<'a>(&self, names: impl Iterator<Item = &'a str>) -> Result<Vec<(String, usize)>> {
        if self.rules.is_empty() {
            return Err(Error::invalid_parameter("rules", "the plan has no rule"));
        }
        let mut used = vec![false; self.rules.len()];
        let mut chosen = Vec::new();
        for name in names {
            let mut first = None;
            for (i, rule) in self.rules.iter().enumerate() {
                if rule.pattern.matches(name) {
                    used[i] = true;
                    first.get_or_insert(i);
                }
            }
            if let Some(i) = first {
                chosen.push((name.to_string(), i));
            }
        }
        if let Some(i) = used.iter().position(|u| !u) {
            let p = &self.rules[i].pattern;
            let what = if p.is_literal() {
                format!(
                    "unknown tensor name `{}`: the checkpoint has no such tensor",
                    p.as_str()
                )
            } else {
                format!(
                    "pattern `{}` matches no tensor of the checkpoint",
                    p.as_str()
                )
            };
            return Err(Error::invalid_parameter("pattern", what));
        }
        chosen.sort();
        Ok(chosen)
    }
}
