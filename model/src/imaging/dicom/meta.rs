//! A metadata summary for the UI and the prompt, with the patient-identifying attributes kept apart.

use std::fmt;

use dicom_dictionary_std::tags;
use dicom_object::DefaultDicomObject;

use super::attr;

/// What the image is: safe to show or put in a prompt (no patient identity).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Modality (CT, MR, CR, US, …).
    pub modality: Option<String>,
    /// Body part examined.
    pub body_part: Option<String>,
    /// Study description.
    pub study_description: Option<String>,
    /// Series description.
    pub series_description: Option<String>,
    /// Columns × rows.
    pub dimensions: Option<(u32, u32)>,
    /// Number of frames.
    pub frames: u32,
    /// Pixel spacing (row spacing, column spacing) in mm.
    pub pixel_spacing: Option<(f64, f64)>,
    /// Slice thickness in mm.
    pub slice_thickness: Option<f64>,
    /// Photometric interpretation.
    pub photometric: Option<String>,
    /// Transfer syntax UID.
    pub transfer_syntax: String,
}

/// Who the image is of: never put in a prompt or exported without the user's consent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PatientIdentity {
    /// Patient's name.
    pub name: Option<String>,
    /// Patient ID.
    pub id: Option<String>,
    /// Patient's birth date.
    pub birth_date: Option<String>,
    /// Patient's sex.
    pub sex: Option<String>,
    /// Institution name.
    pub institution: Option<String>,
    /// Accession number.
    pub accession_number: Option<String>,
}

/// Reads the summary of `obj`.
pub fn summary(obj: &DefaultDicomObject) -> Summary {
    let dims = match (attr::int(obj, tags::COLUMNS), attr::int(obj, tags::ROWS)) {
        (Some(c), Some(r)) if c > 0 && r > 0 => Some((c as u32, r as u32)),
        _ => None,
    };
    let spacing = attr::floats(obj, tags::PIXEL_SPACING).and_then(|v| match v[..] {
        [r, c, ..] if r > 0.0 && c > 0.0 => Some((r, c)),
        _ => None,
    });
    Summary {
        modality: attr::string(obj, tags::MODALITY),
        body_part: attr::string(obj, tags::BODY_PART_EXAMINED),
        study_description: attr::string(obj, tags::STUDY_DESCRIPTION),
        series_description: attr::string(obj, tags::SERIES_DESCRIPTION),
        dimensions: dims,
        frames: attr::int(obj, tags::NUMBER_OF_FRAMES)
            .unwrap_or(1)
            .clamp(1, u32::MAX as i64) as u32,
        pixel_spacing: spacing,
        slice_thickness: attr::float(obj, tags::SLICE_THICKNESS),
        photometric: attr::string(obj, tags::PHOTOMETRIC_INTERPRETATION),
        transfer_syntax: attr::transfer_syntax(obj).to_string(),
    }
}

/// Reads the patient-identifying attributes of `obj`.
pub fn patient_identity(obj: &DefaultDicomObject) -> PatientIdentity {
    PatientIdentity {
        name: attr::string(obj, tags::PATIENT_NAME),
        id: attr::string(obj, tags::PATIENT_ID),
        birth_date: attr::string(obj, tags::PATIENT_BIRTH_DATE),
        sex: attr::string(obj, tags::PATIENT_SEX),
        institution: attr::string(obj, tags::INSTITUTION_NAME),
        accession_number: attr::string(obj, tags::ACCESSION_NUMBER),
    }
}

impl fmt::Display for Summary {
    /// One line: `CT, HEAD, 512×512, 1 frame, spacing 0.5×0.5 mm, thickness 5 mm, "study" / "series"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        parts.extend(self.modality.clone());
        parts.extend(self.body_part.clone());
        if let Some((c, r)) = self.dimensions {
            parts.push(format!("{c}×{r}"));
        }
        parts.push(format!(
            "{} frame{}",
            self.frames,
            if self.frames == 1 { "" } else { "s" }
        ));
        if let Some((r, c)) = self.pixel_spacing {
            parts.push(format!("spacing {r}×{c} mm"));
        }
        if let Some(t) = self.slice_thickness {
            parts.push(format!("thickness {t} mm"));
        }
        for d in [&self.study_description, &self.series_description]
            .into_iter()
            .flatten()
        {
            parts.push(format!("\"{d}\""));
        }
        f.write_str(&parts.join(", "))
    }
}
