"""The volume readers behind :mod:`voco_core.data.io` (its public front:
:class:`~voco_core.data.io.VolumeRecord`, :func:`~voco_core.data.io.read_volume`,
:func:`~voco_core.data.io.check_volume_header`, :func:`~voco_core.data.io.write_volume`).

- :mod:`~voco_core.data.readers.sources`: what a volume source is and which reader
  takes it (suffix rules, DICOM folder sniffing), the volumes a folder holds.
- :mod:`~voco_core.data.readers.nifti`: checks on a NIfTI file before its voxels are
  read (nibabel), and :func:`~voco_core.data.readers.nifti.require_file`.
- :mod:`~voco_core.data.readers.itk`: NRRD and MetaImage files and DICOM series read
  through SimpleITK as RAS+ array and affine; NRRD/MetaImage writing.
- :mod:`~voco_core.data.readers.itk_headers`: header checks shared by the SimpleITK
  readers (3-D scalar, claimed size), ITK messages in one line.
- :mod:`~voco_core.data.readers.dicom`: one DICOM series per folder, series listing,
  slice position checks.

Imports run one way, with no cycle and never back to :mod:`voco_core.data.io`:
``nifti`` <- ``sources``, ``itk_headers`` <- ``dicom`` <- ``itk``. This file imports
nothing: each module has one home, imported by its own name.
"""
