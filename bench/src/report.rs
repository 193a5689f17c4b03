//! The figures: one printed line and one CSV row each, and the percentile they are read at.

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub struct Csv(pub Vec<String>);

impl Csv {
    pub fn row(&mut self, bench: &str, param: &str, metric: &str, value: f64, unit: &str) {
        println!("{bench:<11} {param:<34} {metric:<24} {value:>12.3} {unit}");
        self.0
            .push(format!("{bench},{param},{metric},{value},{unit}"));
    }
}
