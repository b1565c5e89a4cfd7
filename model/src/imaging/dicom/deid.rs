//! De-identification following the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile.
//!
//! Each attribute of the profile's table ([`PROFILE`]) is removed (X), emptied (Z), given a dummy value (D)
//! or, for instance UIDs, replaced by a new UID (U), at every level of nesting. Where the profile allows
//! several actions the strictest that keeps the file valid is used (dates and times are removed or emptied,
//! never shifted). Private attributes, curves, overlays (their comments and data carry text), group lengths
//! and digital signatures are removed. Pixel data is kept byte for byte.
//!
//! New UIDs are `2.25.<128-bit integer>` taken from SHA-256 of an optional secret salt and the original UID:
//! the same original always maps to the same new UID, so files of one series still form one series after
//! de-identification, and references between them stay consistent.
//!
//! Text burned into the pixels is NOT removed: [`DeidReport::burned_in`] says when the file declares it, or
//! when a modality prone to it (US, SC, XA, secondary captures) does not say.

use std::path::Path;

use dicom_core::value::{DataSetSequence, Value};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject};

use super::{DicomFile, DicomOptions, attr};
use crate::error::{Error, Result};

/// What the profile does with an attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// X: remove.
    Remove,
    /// Z: replace with a zero-length value.
    Empty,
    /// D: replace with a dummy value of the same VR.
    Dummy,
    /// U: replace the UID with a new, consistently mapped UID.
    Uid,
}

/// One row of the profile table: tag, keyword, action.
pub type ProfileEntry = (Tag, &'static str, Action);

use Action::{Dummy as D, Empty as Z, Remove as X, Uid as U};

/// The attributes of the Basic Application Level Confidentiality Profile (PS3.15 Table E.1-1) and the action
/// taken on each (the strictest valid one where the profile offers a choice). Repeating groups (curves 50xx,
/// overlays 60xx) and private attributes are handled apart. Retired attributes are in the profile too.
#[allow(deprecated)]
#[rustfmt::skip]
pub const PROFILE: &[ProfileEntry] = &[
    // File meta group: the instance UID follows the SOP Instance UID; the rest is handled in `deidentify`.
    (
        tags::MEDIA_STORAGE_SOP_INSTANCE_UID,
        "MediaStorageSOPInstanceUID",
        U,
    ),
    (tags::AFFECTED_SOP_INSTANCE_UID, "AffectedSOPInstanceUID", X),
    (
        tags::REQUESTED_SOP_INSTANCE_UID,
        "RequestedSOPInstanceUID",
        U,
    ),
    (
        tags::REFERENCED_SOP_INSTANCE_UID_IN_FILE,
        "ReferencedSOPInstanceUIDInFile",
        U,
    ),
    // Instance.
    (tags::INSTANCE_CREATION_DATE, "InstanceCreationDate", X),
    (tags::INSTANCE_CREATION_TIME, "InstanceCreationTime", X),
    (tags::INSTANCE_CREATOR_UID, "InstanceCreatorUID", U),
    (
        tags::INSTANCE_COERCION_DATE_TIME,
        "InstanceCoercionDateTime",
        X,
    ),
    (tags::SOP_INSTANCE_UID, "SOPInstanceUID", U),
    (
        tags::FAILED_SOP_INSTANCE_UID_LIST,
        "FailedSOPInstanceUIDList",
        U,
    ),
    (
        tags::CONTEXT_GROUP_EXTENSION_CREATOR_UID,
        "ContextGroupExtensionCreatorUID",
        U,
    ),
    (tags::CREATOR_VERSION_UID, "CreatorVersionUID", U),
    (tags::TIMEZONE_OFFSET_FROM_UTC, "TimezoneOffsetFromUTC", X),
    // Dates and times.
    (tags::STUDY_DATE, "StudyDate", Z),
    (tags::SERIES_DATE, "SeriesDate", X),
    (tags::ACQUISITION_DATE, "AcquisitionDate", X),
    (tags::CONTENT_DATE, "ContentDate", Z),
    (tags::OVERLAY_DATE, "OverlayDate", X),
    (tags::CURVE_DATE, "CurveDate", X),
    (tags::ACQUISITION_DATE_TIME, "AcquisitionDateTime", X),
    (tags::STUDY_TIME, "StudyTime", Z),
    (tags::SERIES_TIME, "SeriesTime", X),
    (tags::ACQUISITION_TIME, "AcquisitionTime", X),
    (tags::CONTENT_TIME, "ContentTime", Z),
    (tags::OVERLAY_TIME, "OverlayTime", X),
    (tags::CURVE_TIME, "CurveTime", X),
    // Study, institution, staff.
    (tags::ACCESSION_NUMBER, "AccessionNumber", Z),
    (tags::INSTITUTION_NAME, "InstitutionName", X),
    (tags::INSTITUTION_ADDRESS, "InstitutionAddress", X),
    (
        tags::INSTITUTION_CODE_SEQUENCE,
        "InstitutionCodeSequence",
        X,
    ),
    (tags::REFERRING_PHYSICIAN_NAME, "ReferringPhysicianName", Z),
    (
        tags::REFERRING_PHYSICIAN_ADDRESS,
        "ReferringPhysicianAddress",
        X,
    ),
    (
        tags::REFERRING_PHYSICIAN_TELEPHONE_NUMBERS,
        "ReferringPhysicianTelephoneNumbers",
        X,
    ),
    (
        tags::REFERRING_PHYSICIAN_IDENTIFICATION_SEQUENCE,
        "ReferringPhysicianIdentificationSequence",
        X,
    ),
    (
        tags::CONSULTING_PHYSICIAN_NAME,
        "ConsultingPhysicianName",
        X,
    ),
    (
        tags::CONSULTING_PHYSICIAN_IDENTIFICATION_SEQUENCE,
        "ConsultingPhysicianIdentificationSequence",
        X,
    ),
    (tags::STATION_AE_TITLE, "StationAETitle", X),
    (tags::STATION_NAME, "StationName", X),
    (tags::STUDY_DESCRIPTION, "StudyDescription", X),
    (tags::PROCEDURE_CODE_SEQUENCE, "ProcedureCodeSequence", X),
    (tags::SERIES_DESCRIPTION, "SeriesDescription", X),
    (
        tags::SERIES_DESCRIPTION_CODE_SEQUENCE,
        "SeriesDescriptionCodeSequence",
        X,
    ),
    (
        tags::INSTITUTIONAL_DEPARTMENT_NAME,
        "InstitutionalDepartmentName",
        X,
    ),
    (
        tags::INSTITUTIONAL_DEPARTMENT_TYPE_CODE_SEQUENCE,
        "InstitutionalDepartmentTypeCodeSequence",
        X,
    ),
    (tags::PHYSICIANS_OF_RECORD, "PhysiciansOfRecord", X),
    (
        tags::PHYSICIANS_OF_RECORD_IDENTIFICATION_SEQUENCE,
        "PhysiciansOfRecordIdentificationSequence",
        X,
    ),
    (
        tags::PERFORMING_PHYSICIAN_NAME,
        "PerformingPhysicianName",
        X,
    ),
    (
        tags::PERFORMING_PHYSICIAN_IDENTIFICATION_SEQUENCE,
        "PerformingPhysicianIdentificationSequence",
        X,
    ),
    (
        tags::NAME_OF_PHYSICIANS_READING_STUDY,
        "NameOfPhysiciansReadingStudy",
        X,
    ),
    (
        tags::PHYSICIANS_READING_STUDY_IDENTIFICATION_SEQUENCE,
        "PhysiciansReadingStudyIdentificationSequence",
        X,
    ),
    (tags::OPERATORS_NAME, "OperatorsName", X),
    (
        tags::OPERATOR_IDENTIFICATION_SEQUENCE,
        "OperatorIdentificationSequence",
        X,
    ),
    (
        tags::ADMITTING_DIAGNOSES_DESCRIPTION,
        "AdmittingDiagnosesDescription",
        X,
    ),
    (
        tags::ADMITTING_DIAGNOSES_CODE_SEQUENCE,
        "AdmittingDiagnosesCodeSequence",
        X,
    ),
    (
        tags::REFERENCED_STUDY_SEQUENCE,
        "ReferencedStudySequence",
        X,
    ),
    (
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        "ReferencedPerformedProcedureStepSequence",
        X,
    ),
    (
        tags::REFERENCED_PATIENT_SEQUENCE,
        "ReferencedPatientSequence",
        X,
    ),
    (
        tags::REFERENCED_SOP_INSTANCE_UID,
        "ReferencedSOPInstanceUID",
        U,
    ),
    (tags::TRANSACTION_UID, "TransactionUID", U),
    (tags::DERIVATION_DESCRIPTION, "DerivationDescription", X),
    (tags::IRRADIATION_EVENT_UID, "IrradiationEventUID", U),
    (tags::IDENTIFYING_COMMENTS, "IdentifyingComments", X),
    // Patient.
    (tags::PATIENT_NAME, "PatientName", Z),
    (tags::PATIENT_ID, "PatientID", Z),
    (tags::ISSUER_OF_PATIENT_ID, "IssuerOfPatientID", X),
    (
        tags::ISSUER_OF_PATIENT_ID_QUALIFIERS_SEQUENCE,
        "IssuerOfPatientIDQualifiersSequence",
        X,
    ),
    (tags::TYPE_OF_PATIENT_ID, "TypeOfPatientID", X),
    (tags::PATIENT_BIRTH_DATE, "PatientBirthDate", Z),
    (tags::PATIENT_BIRTH_TIME, "PatientBirthTime", X),
    (tags::PATIENT_SEX, "PatientSex", Z),
    (
        tags::PATIENT_INSURANCE_PLAN_CODE_SEQUENCE,
        "PatientInsurancePlanCodeSequence",
        X,
    ),
    (
        tags::PATIENT_PRIMARY_LANGUAGE_CODE_SEQUENCE,
        "PatientPrimaryLanguageCodeSequence",
        X,
    ),
    (
        tags::PATIENT_PRIMARY_LANGUAGE_MODIFIER_CODE_SEQUENCE,
        "PatientPrimaryLanguageModifierCodeSequence",
        X,
    ),
    (tags::OTHER_PATIENT_I_DS, "OtherPatientIDs", X),
    (tags::OTHER_PATIENT_NAMES, "OtherPatientNames", X),
    (
        tags::OTHER_PATIENT_I_DS_SEQUENCE,
        "OtherPatientIDsSequence",
        X,
    ),
    (tags::PATIENT_BIRTH_NAME, "PatientBirthName", X),
    (tags::PATIENT_AGE, "PatientAge", X),
    (tags::PATIENT_SIZE, "PatientSize", X),
    (tags::PATIENT_WEIGHT, "PatientWeight", X),
    (tags::PATIENT_ADDRESS, "PatientAddress", X),
    (
        tags::INSURANCE_PLAN_IDENTIFICATION,
        "InsurancePlanIdentification",
        X,
    ),
    (tags::PATIENT_MOTHER_BIRTH_NAME, "PatientMotherBirthName", X),
    (tags::MILITARY_RANK, "MilitaryRank", X),
    (tags::BRANCH_OF_SERVICE, "BranchOfService", X),
    (tags::MEDICAL_RECORD_LOCATOR, "MedicalRecordLocator", X),
    (
        tags::REFERENCED_PATIENT_PHOTO_SEQUENCE,
        "ReferencedPatientPhotoSequence",
        X,
    ),
    (tags::MEDICAL_ALERTS, "MedicalAlerts", X),
    (tags::ALLERGIES, "Allergies", X),
    (tags::COUNTRY_OF_RESIDENCE, "CountryOfResidence", X),
    (tags::REGION_OF_RESIDENCE, "RegionOfResidence", X),
    (
        tags::PATIENT_TELEPHONE_NUMBERS,
        "PatientTelephoneNumbers",
        X,
    ),
    (
        tags::PATIENT_TELECOM_INFORMATION,
        "PatientTelecomInformation",
        X,
    ),
    (tags::ETHNIC_GROUP, "EthnicGroup", X),
    (tags::OCCUPATION, "Occupation", X),
    (tags::SMOKING_STATUS, "SmokingStatus", X),
    (
        tags::ADDITIONAL_PATIENT_HISTORY,
        "AdditionalPatientHistory",
        X,
    ),
    (tags::PREGNANCY_STATUS, "PregnancyStatus", X),
    (tags::LAST_MENSTRUAL_DATE, "LastMenstrualDate", X),
    (
        tags::PATIENT_RELIGIOUS_PREFERENCE,
        "PatientReligiousPreference",
        X,
    ),
    (tags::PATIENT_SEX_NEUTERED, "PatientSexNeutered", X),
    (tags::RESPONSIBLE_PERSON, "ResponsiblePerson", X),
    (tags::RESPONSIBLE_ORGANIZATION, "ResponsibleOrganization", X),
    (tags::PATIENT_COMMENTS, "PatientComments", X),
    // Equipment and acquisition.
    (tags::CONTRAST_BOLUS_AGENT, "ContrastBolusAgent", Z),
    (tags::DEVICE_SERIAL_NUMBER, "DeviceSerialNumber", X),
    (tags::DEVICE_UID, "DeviceUID", U),
    (tags::PLATE_ID, "PlateID", X),
    (tags::GENERATOR_ID, "GeneratorID", X),
    (tags::CASSETTE_ID, "CassetteID", X),
    (tags::GANTRY_ID, "GantryID", X),
    (tags::PROTOCOL_NAME, "ProtocolName", X),
    (
        tags::ACQUISITION_DEVICE_PROCESSING_DESCRIPTION,
        "AcquisitionDeviceProcessingDescription",
        X,
    ),
    (tags::ACQUISITION_COMMENTS, "AcquisitionComments", X),
    (tags::DETECTOR_ID, "DetectorID", X),
    (
        tags::ACQUISITION_PROTOCOL_DESCRIPTION,
        "AcquisitionProtocolDescription",
        X,
    ),
    (tags::CONTRIBUTION_DESCRIPTION, "ContributionDescription", X),
    // Relationship and frame of reference.
    (tags::STUDY_INSTANCE_UID, "StudyInstanceUID", U),
    (tags::SERIES_INSTANCE_UID, "SeriesInstanceUID", U),
    (tags::STUDY_ID, "StudyID", Z),
    (tags::FRAME_OF_REFERENCE_UID, "FrameOfReferenceUID", U),
    (
        tags::SYNCHRONIZATION_FRAME_OF_REFERENCE_UID,
        "SynchronizationFrameOfReferenceUID",
        U,
    ),
    (tags::MODIFYING_DEVICE_ID, "ModifyingDeviceID", X),
    (
        tags::MODIFYING_DEVICE_MANUFACTURER,
        "ModifyingDeviceManufacturer",
        X,
    ),
    (
        tags::MODIFIED_IMAGE_DESCRIPTION,
        "ModifiedImageDescription",
        X,
    ),
    (tags::IMAGE_COMMENTS, "ImageComments", X),
    (tags::FRAME_COMMENTS, "FrameComments", X),
    (tags::CONCATENATION_UID, "ConcatenationUID", U),
    (
        tags::DIMENSION_ORGANIZATION_UID,
        "DimensionOrganizationUID",
        U,
    ),
    (
        tags::IMAGE_PRESENTATION_COMMENTS,
        "ImagePresentationComments",
        X,
    ),
    (
        tags::LARGE_PALETTE_COLOR_LOOKUP_TABLE_UID,
        "LargePaletteColorLookupTableUID",
        U,
    ),
    // Study / visit / scheduling.
    (tags::STUDY_ID_ISSUER, "StudyIDIssuer", X),
    (tags::SCHEDULED_STUDY_LOCATION, "ScheduledStudyLocation", X),
    (tags::REQUESTING_PHYSICIAN, "RequestingPhysician", X),
    (tags::REQUESTING_SERVICE, "RequestingService", X),
    (
        tags::REQUESTED_PROCEDURE_DESCRIPTION,
        "RequestedProcedureDescription",
        X,
    ),
    (tags::REQUESTED_CONTRAST_AGENT, "RequestedContrastAgent", X),
    (tags::STUDY_COMMENTS, "StudyComments", X),
    (
        tags::REFERENCED_PATIENT_ALIAS_SEQUENCE,
        "ReferencedPatientAliasSequence",
        X,
    ),
    (tags::ADMISSION_ID, "AdmissionID", X),
    (tags::ISSUER_OF_ADMISSION_ID, "IssuerOfAdmissionID", X),
    (
        tags::SCHEDULED_PATIENT_INSTITUTION_RESIDENCE,
        "ScheduledPatientInstitutionResidence",
        X,
    ),
    (tags::ADMITTING_DATE, "AdmittingDate", X),
    (tags::ADMITTING_TIME, "AdmittingTime", X),
    (
        tags::DISCHARGE_DIAGNOSIS_DESCRIPTION,
        "DischargeDiagnosisDescription",
        X,
    ),
    (tags::SPECIAL_NEEDS, "SpecialNeeds", X),
    (tags::SERVICE_EPISODE_ID, "ServiceEpisodeID", X),
    (
        tags::ISSUER_OF_SERVICE_EPISODE_ID,
        "IssuerOfServiceEpisodeID",
        X,
    ),
    (
        tags::SERVICE_EPISODE_DESCRIPTION,
        "ServiceEpisodeDescription",
        X,
    ),
    (tags::CURRENT_PATIENT_LOCATION, "CurrentPatientLocation", X),
    (
        tags::PATIENT_INSTITUTION_RESIDENCE,
        "PatientInstitutionResidence",
        X,
    ),
    (tags::PATIENT_STATE, "PatientState", X),
    (tags::VISIT_COMMENTS, "VisitComments", X),
    // Procedure steps, requests, results.
    (
        tags::SCHEDULED_PROCEDURE_STEP_START_DATE,
        "ScheduledProcedureStepStartDate",
        X,
    ),
    (
        tags::SCHEDULED_PROCEDURE_STEP_END_DATE,
        "ScheduledProcedureStepEndDate",
        X,
    ),
    (
        tags::SCHEDULED_PERFORMING_PHYSICIAN_NAME,
        "ScheduledPerformingPhysicianName",
        X,
    ),
    (
        tags::SCHEDULED_PROCEDURE_STEP_DESCRIPTION,
        "ScheduledProcedureStepDescription",
        X,
    ),
    (
        tags::SCHEDULED_PERFORMING_PHYSICIAN_IDENTIFICATION_SEQUENCE,
        "ScheduledPerformingPhysicianIdentificationSequence",
        X,
    ),
    (
        tags::SCHEDULED_PROCEDURE_STEP_LOCATION,
        "ScheduledProcedureStepLocation",
        X,
    ),
    (tags::PRE_MEDICATION, "PreMedication", X),
    (
        tags::PERFORMED_STATION_AE_TITLE,
        "PerformedStationAETitle",
        X,
    ),
    (tags::PERFORMED_STATION_NAME, "PerformedStationName", X),
    (tags::PERFORMED_LOCATION, "PerformedLocation", X),
    (
        tags::PERFORMED_PROCEDURE_STEP_START_DATE,
        "PerformedProcedureStepStartDate",
        X,
    ),
    (
        tags::PERFORMED_PROCEDURE_STEP_START_TIME,
        "PerformedProcedureStepStartTime",
        X,
    ),
    (
        tags::PERFORMED_PROCEDURE_STEP_END_DATE,
        "PerformedProcedureStepEndDate",
        X,
    ),
    (
        tags::PERFORMED_PROCEDURE_STEP_END_TIME,
        "PerformedProcedureStepEndTime",
        X,
    ),
    (
        tags::PERFORMED_STATION_NAME_CODE_SEQUENCE,
        "PerformedStationNameCodeSequence",
        X,
    ),
    (
        tags::PERFORMED_PROCEDURE_STEP_ID,
        "PerformedProcedureStepID",
        X,
    ),
    (
        tags::PERFORMED_PROCEDURE_STEP_DESCRIPTION,
        "PerformedProcedureStepDescription",
        X,
    ),
    (
        tags::REQUEST_ATTRIBUTES_SEQUENCE,
        "RequestAttributesSequence",
        X,
    ),
    (
        tags::COMMENTS_ON_THE_PERFORMED_PROCEDURE_STEP,
        "CommentsOnThePerformedProcedureStep",
        X,
    ),
    (tags::REQUESTED_PROCEDURE_ID, "RequestedProcedureID", X),
    (
        tags::REASON_FOR_THE_REQUESTED_PROCEDURE,
        "ReasonForTheRequestedProcedure",
        X,
    ),
    (
        tags::PATIENT_TRANSPORT_ARRANGEMENTS,
        "PatientTransportArrangements",
        X,
    ),
    (
        tags::REQUESTED_PROCEDURE_LOCATION,
        "RequestedProcedureLocation",
        X,
    ),
    (
        tags::NAMES_OF_INTENDED_RECIPIENTS_OF_RESULTS,
        "NamesOfIntendedRecipientsOfResults",
        X,
    ),
    (
        tags::INTENDED_RECIPIENTS_OF_RESULTS_IDENTIFICATION_SEQUENCE,
        "IntendedRecipientsOfResultsIdentificationSequence",
        X,
    ),
    (
        tags::PERSON_IDENTIFICATION_CODE_SEQUENCE,
        "PersonIdentificationCodeSequence",
        D,
    ),
    (tags::PERSON_ADDRESS, "PersonAddress", X),
    (tags::PERSON_TELEPHONE_NUMBERS, "PersonTelephoneNumbers", X),
    (
        tags::REQUESTED_PROCEDURE_COMMENTS,
        "RequestedProcedureComments",
        X,
    ),
    (tags::ORDER_ENTERED_BY, "OrderEnteredBy", X),
    (tags::ORDER_ENTERER_LOCATION, "OrderEntererLocation", X),
    (
        tags::ORDER_CALLBACK_PHONE_NUMBER,
        "OrderCallbackPhoneNumber",
        X,
    ),
    (
        tags::PLACER_ORDER_NUMBER_IMAGING_SERVICE_REQUEST,
        "PlacerOrderNumberImagingServiceRequest",
        Z,
    ),
    (
        tags::FILLER_ORDER_NUMBER_IMAGING_SERVICE_REQUEST,
        "FillerOrderNumberImagingServiceRequest",
        Z,
    ),
    (
        tags::IMAGING_SERVICE_REQUEST_COMMENTS,
        "ImagingServiceRequestComments",
        X,
    ),
    (
        tags::CONFIDENTIALITY_CONSTRAINT_ON_PATIENT_DATA_DESCRIPTION,
        "ConfidentialityConstraintOnPatientDataDescription",
        X,
    ),
    (
        tags::PERFORMED_STATION_GEOGRAPHIC_LOCATION_CODE_SEQUENCE,
        "PerformedStationGeographicLocationCodeSequence",
        X,
    ),
    (
        tags::SCHEDULED_HUMAN_PERFORMERS_SEQUENCE,
        "ScheduledHumanPerformersSequence",
        X,
    ),
    (
        tags::HUMAN_PERFORMER_ORGANIZATION,
        "HumanPerformerOrganization",
        X,
    ),
    (tags::HUMAN_PERFORMER_NAME, "HumanPerformerName", X),
    (tags::VERIFYING_ORGANIZATION, "VerifyingOrganization", X),
    (
        tags::VERIFYING_OBSERVER_SEQUENCE,
        "VerifyingObserverSequence",
        D,
    ),
    (tags::VERIFYING_OBSERVER_NAME, "VerifyingObserverName", D),
    (tags::AUTHOR_OBSERVER_SEQUENCE, "AuthorObserverSequence", X),
    (tags::PARTICIPANT_SEQUENCE, "ParticipantSequence", X),
    (
        tags::CUSTODIAL_ORGANIZATION_SEQUENCE,
        "CustodialOrganizationSequence",
        X,
    ),
    (
        tags::VERIFYING_OBSERVER_IDENTIFICATION_CODE_SEQUENCE,
        "VerifyingObserverIdentificationCodeSequence",
        Z,
    ),
    (tags::PERSON_NAME, "PersonName", D),
    (tags::UID, "UID", U),
    (tags::CONTENT_SEQUENCE, "ContentSequence", X),
    (
        tags::TEMPLATE_EXTENSION_ORGANIZATION_UID,
        "TemplateExtensionOrganizationUID",
        U,
    ),
    (
        tags::TEMPLATE_EXTENSION_CREATOR_UID,
        "TemplateExtensionCreatorUID",
        U,
    ),
    (
        tags::GRAPHIC_ANNOTATION_SEQUENCE,
        "GraphicAnnotationSequence",
        X,
    ),
    (tags::CONTENT_CREATOR_NAME, "ContentCreatorName", Z),
    (
        tags::CONTENT_CREATOR_IDENTIFICATION_CODE_SEQUENCE,
        "ContentCreatorIdentificationCodeSequence",
        X,
    ),
    (tags::FIDUCIAL_UID, "FiducialUID", U),
    (
        tags::STORAGE_MEDIA_FILE_SET_UID,
        "StorageMediaFileSetUID",
        U,
    ),
    (tags::ICON_IMAGE_SEQUENCE, "IconImageSequence", X),
    (tags::TOPIC_TITLE, "TopicTitle", X),
    (tags::TOPIC_SUBJECT, "TopicSubject", X),
    (tags::TOPIC_AUTHOR, "TopicAuthor", X),
    (tags::TOPIC_KEYWORDS, "TopicKeywords", X),
    (tags::DIGITAL_SIGNATURE_UID, "DigitalSignatureUID", X),
    (tags::MAC, "MAC", X),
    (
        tags::MODIFIED_ATTRIBUTES_SEQUENCE,
        "ModifiedAttributesSequence",
        X,
    ),
    (
        tags::ORIGINAL_ATTRIBUTES_SEQUENCE,
        "OriginalAttributesSequence",
        X,
    ),
    (tags::TEXT_STRING, "TextString", X),
    (tags::DOSE_REFERENCE_UID, "DoseReferenceUID", U),
    (
        tags::REFERENCED_FRAME_OF_REFERENCE_UID,
        "ReferencedFrameOfReferenceUID",
        U,
    ),
    (
        tags::RELATED_FRAME_OF_REFERENCE_UID,
        "RelatedFrameOfReferenceUID",
        U,
    ),
    (tags::REVIEWER_NAME, "ReviewerName", X),
    (tags::ARBITRARY, "Arbitrary", X),
    (tags::TEXT_COMMENTS, "TextComments", X),
    (tags::RESULTS_ID_ISSUER, "ResultsIDIssuer", X),
    (tags::INTERPRETATION_RECORDER, "InterpretationRecorder", X),
    (
        tags::INTERPRETATION_TRANSCRIBER,
        "InterpretationTranscriber",
        X,
    ),
    (tags::INTERPRETATION_TEXT, "InterpretationText", X),
    (tags::INTERPRETATION_AUTHOR, "InterpretationAuthor", X),
    (
        tags::INTERPRETATION_APPROVER_SEQUENCE,
        "InterpretationApproverSequence",
        X,
    ),
    (
        tags::PHYSICIAN_APPROVING_INTERPRETATION,
        "PhysicianApprovingInterpretation",
        X,
    ),
    (
        tags::INTERPRETATION_DIAGNOSIS_DESCRIPTION,
        "InterpretationDiagnosisDescription",
        X,
    ),
    (
        tags::RESULTS_DISTRIBUTION_LIST_SEQUENCE,
        "ResultsDistributionListSequence",
        X,
    ),
    (tags::DISTRIBUTION_NAME, "DistributionName", X),
    (tags::DISTRIBUTION_ADDRESS, "DistributionAddress", X),
    (tags::INTERPRETATION_ID_ISSUER, "InterpretationIDIssuer", X),
    (tags::IMPRESSIONS, "Impressions", X),
    (tags::RESULTS_COMMENTS, "ResultsComments", X),
    (
        tags::DIGITAL_SIGNATURES_SEQUENCE,
        "DigitalSignaturesSequence",
        X,
    ),
    (tags::DATA_SET_TRAILING_PADDING, "DataSetTrailingPadding", X),
    // Further dates, times and free text (newer editions of the table).
    (tags::DATE_OF_SECONDARY_CAPTURE, "DateOfSecondaryCapture", X),
    (tags::TIME_OF_SECONDARY_CAPTURE, "TimeOfSecondaryCapture", X),
    (tags::DATE_OF_LAST_CALIBRATION, "DateOfLastCalibration", X),
    (tags::TIME_OF_LAST_CALIBRATION, "TimeOfLastCalibration", X),
    (tags::DATE_OF_LAST_DETECTOR_CALIBRATION, "DateOfLastDetectorCalibration", X),
    (tags::TIME_OF_LAST_DETECTOR_CALIBRATION, "TimeOfLastDetectorCalibration", X),
    (tags::FRAME_ACQUISITION_DATE_TIME, "FrameAcquisitionDateTime", D),
    (tags::FRAME_REFERENCE_DATE_TIME, "FrameReferenceDateTime", D),
    (tags::START_ACQUISITION_DATE_TIME, "StartAcquisitionDateTime", D),
    (tags::END_ACQUISITION_DATE_TIME, "EndAcquisitionDateTime", D),
    (tags::RADIOPHARMACEUTICAL_START_TIME, "RadiopharmaceuticalStartTime", X),
    (tags::RADIOPHARMACEUTICAL_STOP_TIME, "RadiopharmaceuticalStopTime", X),
    (tags::RADIOPHARMACEUTICAL_START_DATE_TIME, "RadiopharmaceuticalStartDateTime", X),
    (tags::RADIOPHARMACEUTICAL_STOP_DATE_TIME, "RadiopharmaceuticalStopDateTime", X),
    (tags::PATIENT_BIRTH_DATE_IN_ALTERNATIVE_CALENDAR, "PatientBirthDateInAlternativeCalendar", X),
    (tags::PATIENT_DEATH_DATE_IN_ALTERNATIVE_CALENDAR, "PatientDeathDateInAlternativeCalendar", X),
    (tags::PATIENT_ALTERNATIVE_CALENDAR, "PatientAlternativeCalendar", X),
    (tags::STUDY_VERIFIED_DATE, "StudyVerifiedDate", X),
    (tags::STUDY_VERIFIED_TIME, "StudyVerifiedTime", X),
    (tags::STUDY_READ_DATE, "StudyReadDate", X),
    (tags::STUDY_READ_TIME, "StudyReadTime", X),
    (tags::SCHEDULED_STUDY_START_DATE, "ScheduledStudyStartDate", X),
    (tags::SCHEDULED_STUDY_START_TIME, "ScheduledStudyStartTime", X),
    (tags::STUDY_ARRIVAL_DATE, "StudyArrivalDate", X),
    (tags::STUDY_ARRIVAL_TIME, "StudyArrivalTime", X),
    (tags::STUDY_COMPLETION_DATE, "StudyCompletionDate", X),
    (tags::STUDY_COMPLETION_TIME, "StudyCompletionTime", X),
    (tags::SCHEDULED_STATION_AE_TITLE, "ScheduledStationAETitle", X),
    (tags::SCHEDULED_PROCEDURE_STEP_START_TIME, "ScheduledProcedureStepStartTime", X),
    (tags::SCHEDULED_PROCEDURE_STEP_END_TIME, "ScheduledProcedureStepEndTime", X),
    (tags::SCHEDULED_PROCEDURE_STEP_ID, "ScheduledProcedureStepID", X),
    (tags::SCHEDULED_STATION_NAME, "ScheduledStationName", X),
    (tags::PERFORMED_PROCEDURE_TYPE_DESCRIPTION, "PerformedProcedureTypeDescription", X),
    (tags::COMMENTS_ON_RADIATION_DOSE, "CommentsOnRadiationDose", X),
    (tags::ACQUISITION_CONTEXT_SEQUENCE, "AcquisitionContextSequence", X),
    (tags::REASON_FOR_REQUESTED_PROCEDURE_CODE_SEQUENCE, "ReasonForRequestedProcedureCodeSequence", X),
    (tags::PERSON_TELECOM_INFORMATION, "PersonTelecomInformation", X),
    (tags::REASON_FOR_THE_IMAGING_SERVICE_REQUEST, "ReasonForTheImagingServiceRequest", X),
    (tags::ISSUE_DATE_OF_IMAGING_SERVICE_REQUEST, "IssueDateOfImagingServiceRequest", X),
    (tags::ISSUE_TIME_OF_IMAGING_SERVICE_REQUEST, "IssueTimeOfImagingServiceRequest", X),
    (tags::OBSERVATION_DATE_TIME, "ObservationDateTime", X),
    (tags::DATE_TIME, "DateTime", X),
    (tags::DATE, "Date", X),
    (tags::TIME, "Time", X),
    (tags::TEXT_VALUE, "TextValue", X),
];

/// The value written to DeIdentificationMethod (0012,0063).
pub const METHOD: &str = "PS3.15 E.1 Basic Profile; llava-med";

/// Modalities whose images often carry burned-in text (patient name, dates) in the pixels.
pub const BURNED_IN_PRONE: &[&str] = &["US", "SC", "XA", "ES", "OT"];

/// Options for [`deidentify`].
#[derive(Debug, Clone, Default)]
pub struct DeidOptions {
    /// Secret mixed into the UID hash: with a salt, new UIDs cannot be recomputed from the originals by
    /// someone without it. Keep it to map later exports of the same study to the same UIDs.
    pub uid_salt: String,
}

/// What the file says about text burned into its pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BurnedIn {
    /// BurnedInAnnotation is YES: the pixels carry identifying text, which de-identification leaves.
    Declared,
    /// BurnedInAnnotation is absent for a modality prone to it: the pixels may carry identifying text.
    Undeclared,
    /// BurnedInAnnotation is NO, or absent for a modality not prone to it.
    No,
}

/// What [`deidentify`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct DeidReport {
    /// Modality of the file.
    pub modality: Option<String>,
    /// Attributes removed (profile X, curves, overlays, group lengths), at any depth.
    pub removed: usize,
    /// Attributes emptied (Z).
    pub emptied: usize,
    /// Attributes given a dummy value (D).
    pub dummied: usize,
    /// UID values replaced (U).
    pub uids_replaced: usize,
    /// Private attributes removed.
    pub private_removed: usize,
    /// Burned-in annotation in the pixels.
    pub burned_in: BurnedIn,
}

impl DeidReport {
    /// A warning about burned-in annotation, when there is one to give.
    pub fn burned_in_warning(&self) -> Option<String> {
        let modality = self.modality.as_deref().unwrap_or("unknown modality");
        match self.burned_in {
            BurnedIn::Declared => Some(
                "the file declares burned-in annotation (BurnedInAnnotation = YES): text in the pixels \
                 may identify the patient and was NOT removed"
                    .to_string(),
            ),
            BurnedIn::Undeclared => Some(format!(
                "{modality} images often carry burned-in text and this file does not declare \
                 BurnedInAnnotation: check the pixels, text in them was NOT removed"
            )),
            BurnedIn::No => None,
        }
    }
}

/// A new UID for `uid`: `2.25.` and 128 bits of SHA-256(salt, uid) as a decimal integer (with the UUID
/// version 8 and variant bits set, so it is a valid UUID-derived UID). The same input gives the same UID.
pub fn new_uid(uid: &str, salt: &str) -> String {
    let uid = uid.trim_end_matches(['\0', ' ']);
    let mut input = Vec::with_capacity(salt.len() + uid.len() + 24);
    input.extend_from_slice(b"llava-med deid\0");
    input.extend_from_slice(salt.as_bytes());
    input.push(0);
    input.extend_from_slice(uid.as_bytes());
    let hash = sha256(&input);
    let mut bytes: [u8; 16] = hash[..16].try_into().expect("16 bytes");
    bytes[6] = (bytes[6] & 0x0F) | 0x80; // version 8 (custom)
    bytes[8] = (bytes[8] & 0x3F) | 0x80; // RFC 4122 variant
    format!("2.25.{}", u128::from_be_bytes(bytes))
}

/// De-identifies `obj` in place; the file meta group is updated to match.
pub fn deidentify(obj: &mut DefaultDicomObject, options: &DeidOptions) -> DeidReport {
    let modality = attr::string(obj, tags::MODALITY);
    let sop_class = obj.meta().media_storage_sop_class_uid.clone();
    let burned_in = match attr::string(obj, tags::BURNED_IN_ANNOTATION)
        .map(|s| s.to_ascii_uppercase())
        .as_deref()
    {
        Some("YES") => BurnedIn::Declared,
        Some(_) => BurnedIn::No,
        None => {
            let prone = modality
                .as_deref()
                .is_some_and(|m| BURNED_IN_PRONE.contains(&m))
                // Secondary capture storage classes (1.2.840.10008.5.1.4.1.1.7 and .7.x).
                || {
                    let c = sop_class.trim_end_matches(['\0', ' ']);
                    c == "1.2.840.10008.5.1.4.1.1.7" || c.starts_with("1.2.840.10008.5.1.4.1.1.7.")
                };
            if prone {
                BurnedIn::Undeclared
            } else {
                BurnedIn::No
            }
        }
    };
    let mut report = DeidReport {
        modality,
        removed: 0,
        emptied: 0,
        dummied: 0,
        uids_replaced: 0,
        private_removed: 0,
        burned_in,
    };
    clean(obj, options, &mut report, 0);

    // Attributes saying what was done (PS3.15 E.1.1, PS3.3 C.7.1.1).
    obj.put(DataElement::new(
        tags::PATIENT_IDENTITY_REMOVED,
        VR::CS,
        PrimitiveValue::from("YES"),
    ));
    obj.put(DataElement::new(
        tags::DEIDENTIFICATION_METHOD,
        VR::LO,
        PrimitiveValue::from(METHOD),
    ));
    let code = InMemDicomObject::from_element_iter([
        DataElement::new(tags::CODE_VALUE, VR::SH, PrimitiveValue::from("113100")),
        DataElement::new(
            tags::CODING_SCHEME_DESIGNATOR,
            VR::SH,
            PrimitiveValue::from("DCM"),
        ),
        DataElement::new(
            tags::CODE_MEANING,
            VR::LO,
            PrimitiveValue::from("Basic Application Confidentiality Profile"),
        ),
    ]);
    obj.put(DataElement::new(
        tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
        VR::SQ,
        DataSetSequence::from(vec![code]),
    ));
    obj.put(DataElement::new(
        tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
        VR::CS,
        PrimitiveValue::from("REMOVED"),
    ));

    // File meta group: the instance UID follows the data set's; nothing else identifying is kept.
    let sop_instance = attr::string(obj, tags::SOP_INSTANCE_UID);
    let salt = options.uid_salt.clone();
    obj.update_meta(|meta| {
        meta.media_storage_sop_instance_uid = match sop_instance {
            Some(uid) => uid,
            None => new_uid(&meta.media_storage_sop_instance_uid, &salt),
        };
        meta.source_application_entity_title = None;
        meta.sending_application_entity_title = None;
        meta.receiving_application_entity_title = None;
        meta.private_information_creator_uid = None;
        meta.private_information = None;
    });
    report
}

/// Opens `input`, de-identifies it and writes `output`, then re-opens `output` to check it.
pub fn anonymize_file(input: &Path, output: &Path, options: &DeidOptions) -> Result<DeidReport> {
    let file = DicomFile::open(input, DicomOptions::default())?;
    let mut obj = file.object().clone();
    drop(file);
    let report = super::guard::contain(|| deidentify(&mut obj, options)).map_err(|m| {
        Error::image(
            input,
            format!("de-identification crashed on this file: {m}"),
        )
    })?;
    obj.write_to_file(output)
        .map_err(|e| Error::image(output, format!("cannot write DICOM: {}", super::chain(&e))))?;
    if let Err(e) = DicomFile::open(output, DicomOptions::default()) {
        let _ = std::fs::remove_file(output);
        return Err(Error::image(
            output,
            format!("the de-identified file does not re-open ({e}); removed"),
        ));
    }
    Ok(report)
}

/// The action on `tag` outside the table: private, curve, overlay and group-length attributes are removed.
fn action(tag: Tag) -> Option<Action> {
    if let Some(&(_, _, a)) = PROFILE.iter().find(|(t, _, _)| *t == tag) {
        return Some(a);
    }
    let (group, element) = (tag.group(), tag.element());
    let curve = (0x5000..=0x50FF).contains(&group) && group % 2 == 0;
    let overlay = (0x6000..=0x60FF).contains(&group) && group % 2 == 0;
    let group_length = element == 0 && group != 0x0002;
    (curve || overlay || group_length).then_some(Action::Remove)
}

/// Whether `tag` is private (odd group, excluding the reserved groups 1, 3, 5, 7 and FFFF, which are
/// removed as well).
fn is_private(tag: Tag) -> bool {
    tag.group() % 2 == 1
}

/// The deepest nesting of sequences visited; deeper items are emptied.
const MAX_DEPTH: usize = 64;

fn clean(obj: &mut InMemDicomObject, options: &DeidOptions, report: &mut DeidReport, depth: usize) {
    let tags: Vec<Tag> = obj.tags().collect();
    for tag in tags {
        if is_private(tag) {
            obj.remove_element(tag);
            report.private_removed += 1;
            continue;
        }
        let Some(vr) = obj.get(tag).map(|e| e.vr()) else {
            continue;
        };
        match action(tag) {
            Some(Action::Remove) => {
                obj.remove_element(tag);
                report.removed += 1;
            }
            Some(Action::Empty) => {
                obj.put(DataElement::empty(tag, vr));
                report.emptied += 1;
            }
            Some(Action::Dummy) => {
                obj.put(dummy(tag, vr));
                report.dummied += 1;
            }
            Some(Action::Uid) => {
                let old = obj
                    .get(tag)
                    .and_then(|e| e.to_str().ok())
                    .map(|s| s.into_owned())
                    .unwrap_or_default();
                let new: Vec<String> = old
                    .split('\\')
                    .map(|u| u.trim_matches(['\0', ' ']))
                    .filter(|u| !u.is_empty())
                    .map(|u| new_uid(u, &options.uid_salt))
                    .collect();
                report.uids_replaced += new.len();
                obj.put(DataElement::new(
                    tag,
                    VR::UI,
                    PrimitiveValue::Strs(new.into_iter().collect()),
                ));
            }
            None if vr == VR::SQ => {
                if depth >= MAX_DEPTH {
                    obj.put(DataElement::empty(tag, VR::SQ));
                    report.removed += 1;
                    continue;
                }
                obj.update_value(tag, |v| {
                    if let Value::Sequence(seq) = v {
                        for item in seq.items_mut().iter_mut() {
                            clean(item, options, report, depth + 1);
                        }
                    }
                });
            }
            None => {}
        }
    }
}

/// A dummy value for `tag` of representation `vr`.
fn dummy(tag: Tag, vr: VR) -> DataElement<InMemDicomObject> {
    let text = match vr {
        VR::PN => "ANONYMOUS",
        VR::DA => "19000101",
        VR::TM => "000000",
        VR::DT => "19000101000000",
        VR::AS => "000Y",
        VR::CS | VR::SH | VR::LO | VR::ST | VR::LT | VR::UT | VR::UC | VR::AE => "ANONYMIZED",
        VR::DS | VR::IS => "0",
        // Sequences, binary and unknown representations: zero length.
        _ => return DataElement::empty(tag, vr),
    };
    DataElement::new(tag, vr, PrimitiveValue::from(text))
}

/// SHA-256 (FIPS 180-4) of `data`.
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes(word.try_into().expect("4 bytes"));
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn sha256_matches_known_vectors() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }

    #[test]
    fn new_uids_are_valid_deterministic_and_salted() {
        let a = new_uid("1.2.3.4", "");
        assert_eq!(a, new_uid("1.2.3.4\0", ""));
        assert_ne!(a, new_uid("1.2.3.5", ""));
        assert_ne!(a, new_uid("1.2.3.4", "secret"));
        assert!(a.starts_with("2.25.") && a.len() <= 64, "{a}");
        assert!(a[5..].bytes().all(|c| c.is_ascii_digit()) && !a[5..].starts_with('0'));
    }

    #[test]
    fn nested_items_are_cleaned_with_every_action() {
        let item = InMemDicomObject::from_element_iter([
            DataElement::new(tags::PERSON_NAME, VR::PN, PrimitiveValue::from("Doe^Jane")),
            DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^John")),
            DataElement::new(
                tags::INSTITUTION_NAME,
                VR::LO,
                PrimitiveValue::from("St Elsewhere"),
            ),
            DataElement::new(
                tags::REFERENCED_SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3"),
            ),
            DataElement::new(Tag(0x0009, 0x1001), VR::LO, PrimitiveValue::from("private")),
            DataElement::new(tags::CODE_VALUE, VR::SH, PrimitiveValue::from("T-04000")),
        ]);
        let mut obj = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::REFERENCED_IMAGE_SEQUENCE,
                VR::SQ,
                DataSetSequence::from(vec![item]),
            ),
            DataElement::new(
                Tag(0x6000, 0x3000),
                VR::OW,
                PrimitiveValue::from(vec![0u8; 4]),
            ),
            DataElement::new(Tag(0x0008, 0x0000), VR::UL, PrimitiveValue::from(12u32)),
        ]);
        let mut report = DeidReport {
            modality: None,
            removed: 0,
            emptied: 0,
            dummied: 0,
            uids_replaced: 0,
            private_removed: 0,
            burned_in: BurnedIn::No,
        };
        clean(&mut obj, &DeidOptions::default(), &mut report, 0);
        assert!(obj.get(Tag(0x6000, 0x3000)).is_none() && obj.get(Tag(0x0008, 0x0000)).is_none());
        let seq = obj.get(tags::REFERENCED_IMAGE_SEQUENCE).expect("kept");
        let item = &seq.items().expect("items")[0];
        let s = |t| item.get(t).map(|e| e.to_str().expect("text").into_owned());
        assert_eq!(s(tags::PERSON_NAME).as_deref(), Some("ANONYMOUS"));
        assert_eq!(s(tags::PATIENT_NAME).as_deref(), Some(""));
        assert_eq!(s(tags::INSTITUTION_NAME), None);
        assert_eq!(
            s(tags::REFERENCED_SOP_INSTANCE_UID),
            Some(new_uid("1.2.3", ""))
        );
        assert_eq!(s(Tag(0x0009, 0x1001)), None);
        assert_eq!(s(tags::CODE_VALUE).as_deref(), Some("T-04000"));
        assert_eq!(
            (
                report.removed,
                report.emptied,
                report.dummied,
                report.uids_replaced,
                report.private_removed
            ),
            (3, 1, 1, 1, 1)
        );
    }

    #[test]
    fn profile_has_no_duplicate_tags() {
        let mut seen = std::collections::HashSet::new();
        for (tag, name, _) in PROFILE {
            assert!(seen.insert(*tag), "{name} listed twice");
        }
    }
}
