//! Studies: open a file, a folder (recursively) or a DICOMDIR and group its instances into patients →
//! studies → series, with slices in anatomical order.
//!
//! Only headers are parsed (dicom-rs stops before the pixel data), after the same structural pre-scan as
//! [`DicomFile::open`](super::DicomFile::open) and behind the same panic containment, so a large folder
//! scans quickly and a bad file is listed with its error while the rest still loads. Slices are sorted by
//! ImagePositionPatient projected on the slice normal (the cross product of ImageOrientationPatient's row
//! and column directions), then InstanceNumber; a multi-frame instance contributes one image entry per
//! frame. Objects without pixel data (structured reports, RT plans, presentation states, …) are listed
//! as skipped with the reason. A DICOMDIR is followed through its directory records (PATIENT → STUDY →
//! SERIES → IMAGE and other leaf records with a ReferencedFileID), not by scanning its folder; the referenced
//! files' headers are read and grouped by their own UIDs, so the order of the records does not matter.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use serde::{Deserialize, Serialize};

use super::{DicomFile, DicomOptions, attr, chain, guard, scan};
use crate::error::{Error, Result};

/// The Media Storage Directory Storage SOP class (a DICOMDIR).
const MEDIA_STORAGE_DIRECTORY: &str = "1.2.840.10008.1.3.10";

/// Everything found in a file, folder or DICOMDIR.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Collection {
    /// Patients with their studies and image series, sorted by patient ID.
    pub patients: Vec<Patient>,
    /// DICOM objects that were read but hold no image (listed, not loaded).
    pub skipped: Vec<Skipped>,
    /// Files that could not be read, each with an error naming it.
    pub failed: Vec<Failed>,
}

/// One patient. The name and ID identify the patient: show them only to the user, never in a prompt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Patient {
    /// Patient ID (`None` when the files have none; they are grouped together).
    pub id: Option<String>,
    /// Patient's name.
    pub name: Option<String>,
    /// Studies, sorted by date then UID.
    pub studies: Vec<Study>,
}

/// One study.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Study {
    /// Study Instance UID (empty when the files have none).
    pub uid: String,
    /// Study description, for display.
    pub description: Option<String>,
    /// Study date (DICOM `YYYYMMDD`).
    pub date: Option<String>,
    /// Series, sorted by series number then UID.
    pub series: Vec<Series>,
}

/// One series: its images in anatomical order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// Series Instance UID (empty when the files have none).
    pub uid: String,
    /// Series number.
    pub number: Option<i64>,
    /// Modality (CT, MR, …).
    pub modality: Option<String>,
    /// Series description, for display.
    pub description: Option<String>,
    /// The slice normal used for sorting (unit vector), when the images have an orientation.
    pub normal: Option<[f64; 3]>,
    /// Images (one per frame of each instance), sorted by position along the normal, then instance number.
    pub images: Vec<ImageEntry>,
}

/// One image of a series: a frame of a file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageEntry {
    /// The file.
    pub path: PathBuf,
    /// Frame index in the file (0-based).
    pub frame: u32,
    /// Number of frames of the file.
    pub frames: u32,
    /// SOP Instance UID.
    pub sop_instance_uid: Option<String>,
    /// Instance number.
    pub instance_number: Option<i64>,
    /// ImagePositionPatient (mm).
    pub position: Option<[f64; 3]>,
    /// Position along the series' slice normal (mm), when known.
    pub location: Option<f64>,
    /// Columns × rows.
    pub dimensions: Option<(u32, u32)>,
}

/// A DICOM object listed but not loaded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// The file.
    pub path: PathBuf,
    /// SOP Class UID.
    pub sop_class_uid: Option<String>,
    /// Modality (SR, RTPLAN, PR, …).
    pub modality: Option<String>,
    /// Why it was skipped.
    pub reason: String,
}

/// A file that could not be read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Failed {
    /// The file.
    pub path: PathBuf,
    /// The error (names the file).
    pub error: String,
}

/// What one file's header says, before grouping.
struct Instance {
    patient_id: Option<String>,
    patient_name: Option<String>,
    study_uid: String,
    study_description: Option<String>,
    study_date: Option<String>,
    series_uid: String,
    series_number: Option<i64>,
    series_description: Option<String>,
    modality: Option<String>,
    orientation: Option<[f64; 6]>,
    image: ImageEntry,
}

/// Opens `path`: a DICOM file, a DICOMDIR, or a folder (searched recursively; when it holds a `DICOMDIR`
/// at its top, that is followed instead). Fails only when `path` itself cannot be read; a bad file inside
/// is listed in [`Collection::failed`].
pub fn open(path: &Path, options: DicomOptions) -> Result<Collection> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mut loader = Loader::default();
    if meta.is_dir() {
        let dicomdir = path.join("DICOMDIR");
        if dicomdir.is_file() {
            loader.dicomdir(&dicomdir, options)?;
        } else {
            let mut files = Vec::new();
            walk(path, &mut files, &mut loader.out.failed);
            for f in files {
                loader.file(&f, options, true);
            }
        }
    } else if is_dicomdir_file(path, options) {
        loader.dicomdir(path, options)?;
    } else {
        loader.file(path, options, false);
    }
    Ok(loader.finish())
}

/// Whether `path` is a DICOMDIR (by name, or by its media storage SOP class).
fn is_dicomdir_file(path: &Path, options: DicomOptions) -> bool {
    if path
        .file_name()
        .is_some_and(|n| n.eq_ignore_ascii_case("DICOMDIR"))
    {
        return true;
    }
    matches!(read_header(path, options), Ok((obj, _)) if is_dicomdir(&obj))
}

fn is_dicomdir(obj: &DefaultDicomObject) -> bool {
    obj.meta()
        .media_storage_sop_class_uid
        .trim_end_matches(['\0', ' '])
        == MEDIA_STORAGE_DIRECTORY
}

/// Every regular file under `dir`, sorted, recursively (symbolic links are not followed).
fn walk(dir: &Path, files: &mut Vec<PathBuf>, failed: &mut Vec<Failed>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            failed.push(Failed {
                path: dir.to_path_buf(),
                error: Error::io(dir, e).to_string(),
            });
            return;
        }
    };
    let mut paths: Vec<(PathBuf, std::fs::FileType)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.path(), e.file_type().ok()?)))
        .collect();
    paths.sort_by(|a, b| a.0.cmp(&b.0));
    for (p, t) in paths {
        if t.is_dir() {
            walk(&p, files, failed);
        } else if t.is_file() {
            files.push(p);
        }
    }
}

/// Reads the header of `path` (everything before the pixel data), after the structural pre-scan.
/// Returns the object and whether the file holds pixel data.
fn read_header(path: &Path, options: DicomOptions) -> Result<(DefaultDicomObject, bool)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let max_inflated = options.max_frame_bytes.saturating_add(256 << 20);
    let layout = scan::check(&bytes, max_inflated).map_err(|m| Error::image(path, m))?;
    let checked = &bytes[layout.magic..layout.end];
    let object = guard::contain(|| {
        OpenFileOptions::new()
            .read_preamble(ReadPreamble::Never)
            .read_until(tags::PIXEL_DATA)
            .from_reader(checked)
    })
    .map_err(|m| Error::image(path, format!("the DICOM parser crashed on this file ({m})")))?
    .map_err(|e| Error::image(path, format!("cannot read DICOM: {}", chain(&e))))?;
    Ok((object, layout.pixel_data))
}

/// A text attribute of a data set or item, trimmed; `None` when missing or empty.
fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let s = obj.element_opt(tag).ok()??.to_str().ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!s.is_empty()).then(|| s.to_string())
}

#[derive(Default)]
struct Loader {
    out: Collection,
    instances: Vec<Instance>,
}

impl Loader {
    /// Reads one file's header; errors and non-images go to the lists. With `in_folder`, a DICOMDIR met
    /// while scanning is listed as skipped.
    fn file(&mut self, path: &Path, options: DicomOptions, in_folder: bool) {
        let (obj, pixels) = match read_header(path, options) {
            Ok(r) => r,
            Err(e) => {
                self.out.failed.push(Failed {
                    path: path.to_path_buf(),
                    error: e.to_string(),
                });
                return;
            }
        };
        let sop_class = text(&obj, tags::SOP_CLASS_UID)
            .or_else(|| Some(obj.meta().media_storage_sop_class_uid.clone()))
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
            .filter(|s| !s.is_empty());
        let modality = attr::string(&obj, tags::MODALITY);
        let skip = |reason: &str| Skipped {
            path: path.to_path_buf(),
            sop_class_uid: sop_class.clone(),
            modality: modality.clone(),
            reason: reason.to_string(),
        };
        if is_dicomdir(&obj) {
            let reason = if in_folder {
                "a DICOMDIR (media directory) met while scanning a folder: open it directly to follow it"
            } else {
                "a DICOMDIR (media directory)"
            };
            self.out.skipped.push(skip(reason));
            return;
        }
        if !pixels {
            let what = match modality.as_deref() {
                Some("SR") => "a structured report",
                Some("PR") => "a presentation state",
                Some("KO") => "a key object selection",
                Some(m) if m.starts_with("RT") && m != "RTIMAGE" => "a radiotherapy object",
                _ => "a non-image object",
            };
            self.out
                .skipped
                .push(skip(&format!("{what} without pixel data")));
            return;
        }
        let dims = match (attr::int(&obj, tags::COLUMNS), attr::int(&obj, tags::ROWS)) {
            (Some(c), Some(r))
                if c > 0 && r > 0 && c <= u32::MAX as i64 && r <= u32::MAX as i64 =>
            {
                Some((c as u32, r as u32))
            }
            _ => {
                self.out
                    .skipped
                    .push(skip("pixel data without valid Rows and Columns"));
                return;
            }
        };
        let frames = attr::int(&obj, tags::NUMBER_OF_FRAMES)
            .unwrap_or(1)
            .clamp(1, u32::MAX as i64) as u32;
        let position = attr::floats(&obj, tags::IMAGE_POSITION_PATIENT)
            .and_then(|v| <[f64; 3]>::try_from(v.get(..3)?).ok())
            .filter(|v| v.iter().all(|x| x.is_finite()));
        let orientation = attr::floats(&obj, tags::IMAGE_ORIENTATION_PATIENT)
            .and_then(|v| <[f64; 6]>::try_from(v.get(..6)?).ok())
            .filter(|v| v.iter().all(|x| x.is_finite()));
        self.instances.push(Instance {
            patient_id: attr::string(&obj, tags::PATIENT_ID),
            patient_name: attr::string(&obj, tags::PATIENT_NAME),
            study_uid: attr::string(&obj, tags::STUDY_INSTANCE_UID).unwrap_or_default(),
            study_description: attr::string(&obj, tags::STUDY_DESCRIPTION),
            study_date: attr::string(&obj, tags::STUDY_DATE),
            series_uid: attr::string(&obj, tags::SERIES_INSTANCE_UID).unwrap_or_default(),
            series_number: attr::int(&obj, tags::SERIES_NUMBER),
            series_description: attr::string(&obj, tags::SERIES_DESCRIPTION),
            modality,
            orientation,
            image: ImageEntry {
                path: path.to_path_buf(),
                frame: 0,
                frames,
                sop_instance_uid: attr::string(&obj, tags::SOP_INSTANCE_UID),
                instance_number: attr::int(&obj, tags::INSTANCE_NUMBER),
                position,
                location: None,
                dimensions: dims,
            },
        });
    }

    /// Follows a DICOMDIR's directory records to the files they reference.
    fn dicomdir(&mut self, path: &Path, options: DicomOptions) -> Result<()> {
        let dir = DicomFile::open(path, options)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let records = dir
            .object()
            .element_opt(tags::DIRECTORY_RECORD_SEQUENCE)
            .ok()
            .flatten()
            .and_then(|e| e.items())
            .ok_or_else(|| Error::image(path, "DICOMDIR without a Directory Record Sequence"))?;
        let mut seen = std::collections::HashSet::new();
        for record in records {
            let Some(id) = record
                .element_opt(tags::REFERENCED_FILE_ID)
                .ok()
                .flatten()
                .and_then(|e| e.to_multi_str().ok())
            else {
                continue;
            };
            let mut file = base.to_path_buf();
            let mut valid = !id.is_empty();
            for part in id.iter() {
                let part = part.trim_matches(|c: char| c == '\0' || c.is_whitespace());
                let mut comps = Path::new(part).components();
                match (comps.next(), comps.next()) {
                    (Some(Component::Normal(c)), None) => file.push(c),
                    _ => valid = false,
                }
            }
            if !valid {
                self.out.failed.push(Failed {
                    path: path.to_path_buf(),
                    error: Error::image(
                        path,
                        format!("invalid ReferencedFileID {:?} in a directory record", id),
                    )
                    .to_string(),
                });
                continue;
            }
            if seen.insert(file.clone()) {
                self.file(&file, options, false);
            }
        }
        Ok(())
    }

    /// Groups the instances and sorts everything.
    fn finish(mut self) -> Collection {
        type SeriesMap = BTreeMap<String, Vec<Instance>>;
        let mut tree: BTreeMap<Option<String>, BTreeMap<String, SeriesMap>> = BTreeMap::new();
        for inst in self.instances {
            tree.entry(inst.patient_id.clone())
                .or_default()
                .entry(inst.study_uid.clone())
                .or_default()
                .entry(inst.series_uid.clone())
                .or_default()
                .push(inst);
        }
        for (patient_id, studies) in tree {
            let mut patient = Patient {
                id: patient_id,
                ..Patient::default()
            };
            for (study_uid, series) in studies {
                let mut study = Study {
                    uid: study_uid,
                    ..Study::default()
                };
                for (series_uid, instances) in series {
                    let first = |f: fn(&Instance) -> Option<String>| instances.iter().find_map(f);
                    patient.name = patient.name.or_else(|| first(|i| i.patient_name.clone()));
                    study.description = study
                        .description
                        .or_else(|| first(|i| i.study_description.clone()));
                    study.date = study.date.or_else(|| first(|i| i.study_date.clone()));
                    study.series.push(build_series(series_uid, instances));
                }
                study
                    .series
                    .sort_by(|a, b| cmp_opt(&a.number, &b.number).then_with(|| a.uid.cmp(&b.uid)));
                patient.studies.push(study);
            }
            patient
                .studies
                .sort_by(|a, b| cmp_opt(&a.date, &b.date).then_with(|| a.uid.cmp(&b.uid)));
            self.out.patients.push(patient);
        }
        self.out
    }
}

/// `Some` before `None`, then by value.
fn cmp_opt<T: Ord>(a: &Option<T>, b: &Option<T>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.cmp(b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// The unit slice normal of an ImageOrientationPatient (row × column direction).
fn normal(o: &[f64; 6]) -> Option<[f64; 3]> {
    let (r, c) = ([o[0], o[1], o[2]], [o[3], o[4], o[5]]);
    let n = [
        r[1] * c[2] - r[2] * c[1],
        r[2] * c[0] - r[0] * c[2],
        r[0] * c[1] - r[1] * c[0],
    ];
    let len = (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt();
    (len > 1e-6 && len.is_finite()).then(|| [n[0] / len, n[1] / len, n[2] / len])
}

fn build_series(uid: String, instances: Vec<Instance>) -> Series {
    let first = |f: fn(&Instance) -> Option<String>| instances.iter().find_map(f);
    let modality = first(|i| i.modality.clone());
    let description = first(|i| i.series_description.clone());
    let number = instances.iter().find_map(|i| i.series_number);
    let normal = instances
        .iter()
        .find_map(|i| i.orientation.as_ref())
        .and_then(normal);
    let mut images = Vec::new();
    for inst in instances {
        let location = match (normal, inst.image.position) {
            (Some(n), Some(p)) => Some(n[0] * p[0] + n[1] * p[1] + n[2] * p[2]),
            _ => None,
        };
        for frame in 0..inst.image.frames {
            images.push(ImageEntry {
                frame,
                location,
                ..inst.image.clone()
            });
        }
    }
    images.sort_by(|a, b| {
        let by_location = match (a.location, b.location) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            _ => Ordering::Equal,
        };
        by_location
            .then_with(|| cmp_opt(&a.instance_number, &b.instance_number))
            .then_with(|| a.path.cmp(&b.path))
            .then_with(|| a.frame.cmp(&b.frame))
    });
    Series {
        uid,
        number,
        modality,
        description,
        normal,
        images,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_of_axial_is_z() {
        assert_eq!(
            normal(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
            Some([0.0, 0.0, 1.0])
        );
        assert_eq!(normal(&[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]), None);
    }

    #[test]
    fn missing_values_sort_last() {
        assert_eq!(cmp_opt(&Some(1), &None), Ordering::Less);
        assert_eq!(cmp_opt(&Some(1), &Some(2)), Ordering::Less);
    }
}
