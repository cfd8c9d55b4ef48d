"""The return AE over DICOM TLS (PS3.15 Annex B), configured like the main listener: [return.tls] on the
return port makes it TLS-only; the reader's DCMTK storescu with a client certificate gets its SR filed at
the hospital re-identified, a plain association to that port gets nowhere."""

from __future__ import annotations

import pydicom
from conftest import StoreSCP, free_port, listening, storescu, wait_for
from studies import PHI, make_study
from test_return import RETURN_AE, read_all, sr_report, with_return, write
from test_tls import pki, tls_args  # noqa: F401 - pki is a fixture


def test_results_over_tls_reach_the_hospital_and_plain_is_refused(tmp_path, pki, make_node, make_storescp):  # noqa: F811
    reader = make_storescp(name="reader").start()
    hospital = StoreSCP(tmp_path / "hospital", free_port(), "HOSPACS").start()
    try:
        node = make_node([("TELERAD", reader.port)])
        with_return(node, hospital.port)
        node.config.write_text(node.config.read_text() + "\n".join([
            "", "[return.tls]", f"port = {node.return_port}", f'certificate = "{pki.server.cert}"',
            f'private_key = "{pki.server.key}"', f'ca_certificates = "{pki.ca}"', ""]))
        node.start()
        assert wait_for(lambda: listening(node.return_port), 30)
        study = make_study(tmp_path / "study", instances=1, series=1)
        assert storescu(node.port, study.files).returncode == 0
        assert wait_for(lambda: len(reader.files()) == 1, 60)
        report = write(sr_report(read_all(reader.files())), tmp_path / "results", "sr")

        plain = storescu(node.return_port, [report], calling="TELERAD", called=RETURN_AE)
        assert plain.returncode != 0  # TLS only: a plain association does not come up
        secure = storescu(node.return_port, [report], calling="TELERAD", called=RETURN_AE,
                          extra=tls_args(pki, pki.client))
        assert secure.returncode == 0, secure.stderr
        assert wait_for(lambda: len(hospital.files()) == 1, 60)
        delivered = pydicom.dcmread(hospital.files()[0])
        assert delivered.PatientID == PHI["PatientID"] and delivered.StudyInstanceUID == study.study_uid
        assert node.stop() == 0
    finally:
        hospital.stop()
