-- Orthanc auto-routing to the AI node (Orthanc 1.10 Lua): when a study becomes stable, send it
-- to the modality AI_MODALITY (declared in DicomModalities), once, and never the node's own results.
--
-- Why it looks like this (see the README, "Connect to a PACS"):
--  * OnStableStudy fires again when the results are stored into the same study; the study is
--    therefore marked (user metadata AI_MARK, declared under "UserMetadata" in orthanc.json) when
--    it is routed, and marked studies are not routed again.
--  * Series the AI node sent (RemoteAET = AI_AET) and SEG/SR series are never a reason to route;
--    a study holding only such series is left alone. A Secondary Capture series alone is not
--    skipped: real studies may carry one of their own.
--  * In 1.10, SendToModality() takes instances only; a whole study goes through the REST API.
AI_MODALITY = 'hippoai'
AI_AET = 'HIPPOAI'
AI_MARK = 'AiRouted'

local function IsResultSeries(seriesId, modality)
  if modality == 'SEG' or modality == 'SR' then
    return true
  end
  local metadata = ParseJson(RestApiGet('/series/' .. seriesId .. '/metadata?expand'))
  return metadata['RemoteAET'] == AI_AET
end

function OnStableStudy(studyId, tags, metadata)
  local studyMetadata = ParseJson(RestApiGet('/studies/' .. studyId .. '/metadata?expand'))
  if studyMetadata[AI_MARK] ~= nil then
    print('autoroute: study ' .. studyId .. ' was already routed to ' .. AI_MODALITY .. '; not again')
    return
  end
  local inputs = 0
  for _, series in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    if not IsResultSeries(series['ID'], series['MainDicomTags']['Modality']) then
      inputs = inputs + 1
    end
  end
  if inputs == 0 then
    print('autoroute: study ' .. studyId .. ' holds only AI results; not routed')
    return
  end
  RestApiPut('/studies/' .. studyId .. '/metadata/' .. AI_MARK, 'yes')
  RestApiPost('/modalities/' .. AI_MODALITY .. '/store',
              DumpJson({Resources = {studyId}, Asynchronous = true}, true))
  print('autoroute: study ' .. studyId .. ' (' .. inputs .. ' series) sent to ' .. AI_MODALITY)
end
