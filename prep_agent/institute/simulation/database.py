"""The PREP database of a cut: the CSV in the real INE/OPLE layout and its delivery zip."""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from datetime import datetime, timedelta

from prep_agent.institute.simulation.count import Cut, computed_total
from prep_agent.institute.simulation.election import (
    ALL_ILLEGIBLE,
    NO_ACTA,
    OUT_OF_CATALOG,
    STATE_ID,
    STATE_NAME,
    VOTE_COLUMNS,
    Acta,
    Municipality,
)

CSV_NAME = "COAH_AYUN_2021.csv"
"""The PREP database, at ``datos/`` and inside the delivery zip."""
CSV_PATH = f"datos/{CSV_NAME}"

SUMMARY_HEADER = (
    "ACTAS_ESPERADAS",
    "ACTAS_REGISTRADAS",
    "ACTAS_FUERA_CATALOGO",
    "ACTAS_CAPTURADAS",
    "PORCENTAJE_ACTAS_CAPTURADAS",
    "ACTAS_CONTABILIZADAS",
    "PORCENTAJE_ACTAS_CONTABILIZADAS",
    "PORCENTAJE_ACTAS_INCONSISTENCIAS",
    "ACTAS_NO_CONTABILIZADAS",
    "LISTA_NOMINAL_ACTAS_CONTABILIZADAS",
    "TOTAL_VOTOS_C_CS",
    "TOTAL_VOTOS_S_CS",
    "PORCENTAJE_PARTICIPACION_CIUDADANA",
)
"""Line 3 of the PREP CSV (as in the real 2021 AYUN files)."""
ACTA_HEADER = (
    "CLAVE_CASILLA",
    "CLAVE_ACTA",
    "ID_ESTADO",
    "ESTADO",
    "ID_MUNICIPIO",
    "MUNICIPIO",
    "SECCION",
    "ID_CASILLA",
    "TIPO_CASILLA",
    "EXT_CONTIGUA",
    "UBICACION_CASILLA",
    "TIPO_ACTA",
    "TOTAL_BOLETAS_SOBRANTES",
    "TOTAL_PERSONAS_VOTARON",
    "TOTAL_REP_PARTIDO_CI_VOTARON",
    "TOTAL_VOTOS_SACADOS",
    *VOTE_COLUMNS,
    "TOTAL_VOTOS_ASENTADO",
    "TOTAL_VOTOS_CALCULADO",
    "LISTA_NOMINAL",
    "REPRESENTANTES_PP_CI",
    "OBSERVACIONES",
    "CONTABILIZADA",
    "MECANISMOS_TRASLADO",
    "SHA",
    "FECHA_HORA_ACOPIO",
    "FECHA_HORA_CAPTURA",
    "FECHA_HORA_VERIFICACION",
    "ORIGEN",
    "DIGITALIZACION",
    "TIPO_DOCUMENTO",
)
"""Header of the per-acta table of the PREP CSV."""


def zip_path(cut_time: datetime) -> str:
    """Path of a cut's delivery zip, named by its cut minute in ``cut_time``'s offset."""
    return f"datos/{cut_time:%Y%m%d_%H%M}_PREP_AYUN_COAH.zip"


def csv_bytes(cut: Cut) -> bytes:
    """The PREP database in the real layout: UTF-8 with BOM, LF line ends."""
    state, _ = cut.tallies()
    summary = (
        state.expected,
        state.captured + cut.out_of_catalog,
        cut.out_of_catalog,
        state.captured,
        state.percent(state.captured),
        state.counted,
        state.percent(state.counted),
        state.percent(state.inconsistent),
        state.captured - state.counted,
        state.nominal,
        state.total,
        state.total_no_special,
        state.participation(),
    )
    buffer = io.StringIO()
    buffer.write(f"\ufeffAYUNTAMIENTOS\n{cut.stamp}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_HEADER)
    writer.writerow(summary)
    buffer.write("\n")
    writer.writerow(ACTA_HEADER)
    names = {m.id: m for m in cut.election.municipalities}
    for acta, verified in cut.captured:
        writer.writerow(_acta_row(acta, names[acta.municipality], verified, cut.sim.seed))
    for index in range(cut.out_of_catalog):
        writer.writerow(_out_of_catalog_row(cut, index))
    return buffer.getvalue().encode("utf-8")


def _timestamp(moment: datetime) -> str:
    return f"{moment:%d/%m/%Y %H:%M:%S}"


def _acta_row(acta: Acta, muni: Municipality, verified: datetime, seed: int) -> list[str]:
    """One row of the per-acta table."""
    captured = verified - timedelta(seconds=acta.capture_lag)
    gathered = (captured - timedelta(minutes=acta.gather_lag)).replace(second=0)
    scanned = acta.problem != NO_ACTA
    image = hashlib.sha256(f"{seed}:{acta.clave_acta}".encode()).hexdigest() if scanned else ""
    return [
        acta.clave_casilla,
        acta.clave_acta,
        STATE_ID,
        STATE_NAME,
        f"{acta.municipality:03d}",
        muni.upper,
        f"{acta.section:04d}",
        f"{acta.number:02d}",
        acta.kind,
        f"{acta.ext:02d}",
        "2" if acta.rural else "1",
        acta.acta_type,
        *_count_cells(acta),
        *vote_cells(acta, muni),
        str(acta.nominal),
        str(acta.reps),
        acta.problem,
        "1" if acta.counted else "0",
        acta.transfer,
        image,
        _timestamp(gathered),
        _timestamp(captured),
        _timestamp(verified),
        acta.origin,
        "MOVIL" if acta.origin == "CASILLA" else "ESCANER",
        "ACTA PREP",
    ]


def _count_cells(acta: Acta) -> list[str]:
    """TOTAL_BOLETAS_SOBRANTES .. TOTAL_VOTOS_SACADOS."""
    if acta.problem in (NO_ACTA, ALL_ILLEGIBLE):
        return ["0"] * 4
    voters = sum(acta.votes) - acta.reps
    return [str(acta.sobrantes), str(voters), str(acta.reps), str(voters + acta.reps)]


def vote_cells(acta: Acta, muni: Municipality) -> list[str]:
    """The vote columns, TOTAL_VOTOS_ASENTADO and TOTAL_VOTOS_CALCULADO."""
    runs = [*muni.options, True, True]
    if acta.problem in (NO_ACTA, ALL_ILLEGIBLE):
        fill = "-" if acta.problem == NO_ACTA else "Ilegible"
        return [fill if r else "-" for r in runs] + [fill, fill]
    cells = [str(v) if r else "-" for v, r in zip(acta.votes, runs)]
    for i, text in acta.unreadable:
        cells[i] = text
    computed = computed_total(acta)
    return [*cells, str(max(0, computed + acta.written_delta)), str(computed)]


def _out_of_catalog_row(cut: Cut, index: int) -> list[str]:
    """An acta whose identification matches no approved casilla."""
    seen = 4 * (index + 1)
    gathered = cut.cut_time - (cut.sequence - seen + 0.4) * timedelta(
        seconds=cut.sim.period_seconds
    )
    image = hashlib.sha256(f"{cut.sim.seed}:fuera:{index}".encode()).hexdigest()
    dashes = ["-"] * (len(ACTA_HEADER) - 14)
    when = _timestamp(gathered.replace(second=0))
    tail = [OUT_OF_CATALOG, "0", "-", image, when, "-", "-", "CATD", "ESCANER", "ACTA PREP"]
    return ["-", "-", STATE_ID, STATE_NAME, *dashes, *tail]


def zip_bytes(cut_time: datetime, csv_data: bytes) -> bytes:
    """The delivery zip: the CSV stamped with the cut minute, and the LEEME."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data, when in (
            ("LEEME.txt", LEEME.encode("utf-8"), (2021, 5, 3, 10, 0, 0)),
            (CSV_NAME, csv_data, cut_time.timetuple()[:6]),
        ):
            info = zipfile.ZipInfo(name, date_time=when)  # type: ignore[arg-type]
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


LEEME = """\
PREP Coahuila 2021, Ayuntamientos: instructivo del archivo CSV (SIMULACIÓN)

Este paquete es parte de una simulación con datos ficticios. Los nombres de los
municipios son reales; las casillas, los votos y las actas son inventados.

Contenido
- COAH_AYUN_2021.csv: base de datos del PREP al corte de información.

Estructura del archivo CSV (UTF-8, separado por comas)
Renglón 1: nombre de la elección.
Renglón 2: fecha y hora del corte de información, con su huso horario (UTC-6).
Renglón 3: encabezados del resumen; renglón 4: sus valores.
  ACTAS_ESPERADAS: actas de todas las casillas aprobadas.
  ACTAS_REGISTRADAS: actas registradas en el sistema, incluidas las fuera de catálogo.
  ACTAS_FUERA_CATALOGO: actas registradas que no corresponden a una casilla aprobada.
  ACTAS_CAPTURADAS: actas esperadas registradas al momento del corte.
  ACTAS_CONTABILIZADAS: actas capturadas cuyos datos se suman a los resultados.
  PORCENTAJE_ACTAS_INCONSISTENCIAS: actas con algún dato ilegible, sin dato o que
    excede la lista nominal, respecto de las esperadas.
  TOTAL_VOTOS_C_CS / TOTAL_VOTOS_S_CS: votos de las actas contabilizadas, con y sin
    casillas especiales.
  PORCENTAJE_PARTICIPACION_CIUDADANA: votos respecto de la lista nominal de las
    actas contabilizadas.
Renglón 5: vacío.
Renglón 6: encabezados de la tabla de actas; después, un renglón por acta registrada.
  CLAVE_CASILLA: ID_ESTADO, SECCION, TIPO_CASILLA, ID_CASILLA y EXT_CONTIGUA.
  CLAVE_ACTA: CLAVE_CASILLA seguida del tipo de acta.
  TIPO_CASILLA: B básica, C contigua, E extraordinaria, S especial.
  UBICACION_CASILLA: 1 urbana, 2 no urbana.
  PAN ... FXM, CAND_IND_1, C_PRI_PRD: votos por partido, candidatura independiente
    y combinaciones de la coalición; "-" donde no hay candidatura.
  NO_REGISTRADOS, NULOS: votos por candidaturas no registradas y votos nulos.
  TOTAL_VOTOS_ASENTADO: total escrito en el acta; TOTAL_VOTOS_CALCULADO: suma que
    hace el sistema.
  OBSERVACIONES: ALGÚN CAMPO ILEGIBLE O SIN DATO, TODOS ILEGIBLES O SIN DATO,
    EXCEDE LISTA NOMINAL, SIN ACTA POR PAQUETE NO ENTREGADO, FUERA DE CATÁLOGO.
  CONTABILIZADA: 1 sí, 0 no.
  MECANISMOS_TRASLADO: D, F o I, según el mecanismo de traslado del paquete.
  SHA: código de integridad (SHA-256) de la imagen del acta.
  FECHA_HORA_ACOPIO, FECHA_HORA_CAPTURA, FECHA_HORA_VERIFICACION: DD/MM/AAAA HH:MM:SS.
  ORIGEN: CATD o CASILLA; DIGITALIZACION: ESCANER o MOVIL.
"""
"""The LEEME.txt of the delivery zip (identical in every cut)."""
