//! VOI windows: named presets, the file's own window, or a robust one from the pixel distribution; applied
//! with the linear function of DICOM PS3.3 C.11.2.1.2.

use std::fmt;
use std::str::FromStr;

/// Which window to render with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WindowChoice {
    /// The file's first window; `Auto` when it has none or its width is ≤ 0.
    Default,
    /// From the 0.5th and 99.5th percentiles of the frame's modality values.
    Auto,
    /// A fixed window (center, width) in modality units (HU for CT).
    Fixed(Window),
}

/// A VOI window in modality units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// Window center (level).
    pub center: f64,
    /// Window width, > 0.
    pub width: f64,
}

/// Named presets (center, width), CT conventions.
pub const PRESETS: [(&str, Window); 5] = [
    ("soft-tissue", Window::new(40.0, 400.0)),
    ("lung", Window::new(-600.0, 1500.0)),
    ("bone", Window::new(480.0, 2500.0)),
    ("brain", Window::new(40.0, 80.0)),
    ("liver", Window::new(90.0, 150.0)),
];

impl Window {
    /// A window of `center` and `width`.
    pub const fn new(center: f64, width: f64) -> Self {
        Self { center, width }
    }

    /// Maps a modality value to 8 bits: y = ((x − (c − 0.5)) / (w − 1) + 0.5) × 255, clipped, rounded half
    /// up. A width ≤ 1 is a threshold at c − 0.5.
    pub fn apply(&self, x: f32) -> u8 {
        let (c, w, x) = (self.center, self.width, f64::from(x));
        if w <= 1.0 {
            return if x <= c - 0.5 { 0 } else { 255 };
        }
        let y = ((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0;
        (y.clamp(0.0, 255.0) + 0.5).floor() as u8
    }

    /// A robust window from the 0.5th–99.5th percentiles of `values` (non-finite values ignored).
    pub fn auto(values: &[f32]) -> Self {
        let mut v: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::new(0.5, 2.0);
        }
        let pick = |v: &mut Vec<f32>, q: f64| {
            let i = ((v.len() - 1) as f64 * q).round() as usize;
            *v.select_nth_unstable_by(i, f32::total_cmp).1
        };
        let lo = f64::from(pick(&mut v, 0.005));
        let hi = f64::from(pick(&mut v, 0.995));
        // The linear function maps [c − 0.5 − (w−1)/2, c − 0.5 + (w−1)/2] to [0, 255].
        let width = (hi - lo + 1.0).max(2.0);
        Self::new((lo + hi) / 2.0 + 0.5, width)
    }
}

impl WindowChoice {
    /// The window to use for a frame with `file_window` and modality `values`.
    pub fn resolve(&self, file_window: Option<(f64, f64)>, values: &[f32]) -> Window {
        match self {
            Self::Fixed(w) => *w,
            Self::Default => match file_window {
                Some((c, w)) if w > 0.0 && c.is_finite() && w.is_finite() => Window::new(c, w),
                _ => Window::auto(values),
            },
            Self::Auto => Window::auto(values),
        }
    }
}

impl FromStr for WindowChoice {
    type Err = String;

    /// `default`, `auto`, a preset name, or `CENTER,WIDTH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "default" => return Ok(Self::Default),
            "auto" => return Ok(Self::Auto),
            _ => {}
        }
        if let Some((_, w)) = PRESETS.iter().find(|(name, _)| *name == s) {
            return Ok(Self::Fixed(*w));
        }
        let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        let bad = || {
            format!(
                "unknown window `{s}`: use default, auto, {}, or CENTER,WIDTH (e.g. 40,400)",
                names.join(", ")
            )
        };
        let (c, w) = s.split_once(',').ok_or_else(bad)?;
        let c: f64 = c.trim().parse().map_err(|_| bad())?;
        let w: f64 = w.trim().parse().map_err(|_| bad())?;
        if !c.is_finite() || !w.is_finite() || w <= 0.0 {
            return Err(format!("window `{s}`: the width must be positive"));
        }
        Ok(Self::Fixed(Window::new(c, w)))
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "center {} width {}", self.center, self.width)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_presets_and_custom_windows() {
        assert_eq!(
            "lung".parse::<WindowChoice>(),
            Ok(WindowChoice::Fixed(Window::new(-600.0, 1500.0)))
        );
        assert_eq!(
            "-600, 1500".parse::<WindowChoice>(),
            Ok(WindowChoice::Fixed(Window::new(-600.0, 1500.0)))
        );
        assert_eq!("auto".parse::<WindowChoice>(), Ok(WindowChoice::Auto));
        assert!("40,0".parse::<WindowChoice>().is_err());
        assert!("bones".parse::<WindowChoice>().is_err());
    }

    #[test]
    fn applies_the_dicom_linear_function() {
        let w = Window::new(40.0, 400.0);
        assert_eq!(w.apply(-1000.0), 0);
        assert_eq!(w.apply(1000.0), 255);
        // x = c - 0.5 maps to the middle: 127.5, rounded up.
        assert_eq!(w.apply(39.5), 128);
        assert_eq!(Window::new(0.0, 1.0).apply(-1.0), 0);
        assert_eq!(Window::new(0.0, 1.0).apply(0.0), 255);
    }

    #[test]
    fn default_falls_back_to_auto_for_a_zero_width() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let w = WindowChoice::Default.resolve(Some((0.0, 0.0)), &values);
        assert!(w.width > 900.0 && w.width < 1000.0, "{w}");
        assert_eq!(w.apply(0.0), 0);
        assert_eq!(w.apply(999.0), 255);
    }
}
